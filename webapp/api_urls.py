"""The JSON API: each app contributes its routes; ``storage/`` says what the user stores against their quota."""

from django.urls import include, path
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from .storage import usage


@api_view(["GET"])
def storage(request: Request) -> Response:
    return Response(usage(request.user).to_dict())


urlpatterns = [
    path("", include("webapp.datasets.api_urls")),
    path("", include("webapp.training.api_urls")),
    path("", include("webapp.trunks.api_urls")),
    path("storage/", storage, name="api-storage"),
]
