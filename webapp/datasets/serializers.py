"""JSON shapes of the datasets API (the storage path is never exposed)."""

from __future__ import annotations

from rest_framework import serializers

from ..api_fields import refuse_other_fields
from . import services
from .models import Dataset


class DatasetSerializer(serializers.ModelSerializer):
    class Meta:
        model = Dataset
        fields = [
            "id", "name", "original_filename", "file_format", "kind", "num_examples", "size_bytes", "sha256",
            "created_at",
        ]
        read_only_fields = fields


class DatasetUploadSerializer(serializers.Serializer):
    """A multipart upload: ``file`` and an optional ``name``, nothing else; the file is checked by create_dataset."""

    # Empty files pass here so that the parser names the file and says what it needs.
    file = serializers.FileField(allow_empty_file=True, use_url=False)
    name = serializers.CharField(required=False, allow_blank=True, max_length=services.NAME_MAX_LENGTH)

    def to_internal_value(self, data):
        """Every other field is refused by name (the dataset's own fields are the server's to set)."""
        refuse_other_fields(data, self.fields, DatasetSerializer.Meta.fields)
        return super().to_internal_value(data)
