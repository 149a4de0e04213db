"""Read-only API: trunk status for any signed-in user, and the base models that can be trained."""

from __future__ import annotations

from rest_framework import generics
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .models import TrunkServer
from .selection import served_model_summaries
from .serializers import ServedModelSerializer, StaffTrunkServerSerializer, TrunkServerSerializer


class TrunkListView(generics.ListAPIView):
    """Every trunk server with its last health check (never its token); addresses and errors for staff only."""

    queryset = TrunkServer.objects.all()

    def get_serializer_class(self) -> type[TrunkServerSerializer]:
        return StaffTrunkServerSerializer if self.request.user.is_staff else TrunkServerSerializer


class ModelListView(APIView):
    """Base models served by a healthy trunk and present in MODELS_DIR, with their free capacity."""

    def get(self, request: Request) -> Response:
        return Response(ServedModelSerializer(served_model_summaries(), many=True).data)
