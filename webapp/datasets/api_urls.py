from django.urls import path

from . import api

urlpatterns = [
    path("datasets/", api.DatasetListCreate.as_view(), name="api-dataset-list"),
    path("datasets/<int:pk>/", api.DatasetRetrieveDestroy.as_view(), name="api-dataset-detail"),
]
