from django.urls import path

from . import api

urlpatterns = [
    path("trunks/", api.TrunkListView.as_view(), name="api-trunk-list"),
    path("models/", api.ModelListView.as_view(), name="api-model-list"),
]
