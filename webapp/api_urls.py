"""The JSON API: each app contributes its routes."""

from django.urls import include, path

urlpatterns = [
    path("", include("webapp.datasets.api_urls")),
    path("", include("webapp.training.api_urls")),
    path("", include("webapp.trunks.api_urls")),
]
