"""Datasets API: list and upload (``datasets/``), show and delete (``datasets/<id>/``)."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import generics, serializers, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from webapp.ownership import owned

from . import services
from .models import Dataset
from .serializers import DatasetSerializer, DatasetUploadSerializer


class OwnDatasetsMixin:
    def get_queryset(self):
        return owned(Dataset, self.request.user)


class DatasetListCreate(OwnDatasetsMixin, generics.ListCreateAPIView):
    parser_classes = [MultiPartParser, FormParser]

    def get_serializer_class(self):
        return DatasetUploadSerializer if self.request.method == "POST" else DatasetSerializer

    def create(self, request, *args, **kwargs) -> Response:
        upload = self.get_serializer(data=request.data)
        upload.is_valid(raise_exception=True)
        try:
            dataset = services.create_dataset(
                request.user, upload.validated_data["file"], upload.validated_data.get("name", "")
            )
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from exc
        return Response(DatasetSerializer(dataset, context=self.get_serializer_context()).data,
                        status=status.HTTP_201_CREATED)


class DatasetRetrieveDestroy(OwnDatasetsMixin, generics.RetrieveDestroyAPIView):
    serializer_class = DatasetSerializer

    def destroy(self, request, *args, **kwargs) -> Response:
        try:
            services.delete_dataset(self.get_object())
        except services.DatasetInUse as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(status=status.HTTP_204_NO_CONTENT)
