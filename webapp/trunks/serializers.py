"""JSON shapes of the trunk API. The token and the CA certificate are never part of them."""

from __future__ import annotations

from rest_framework import serializers

from .models import TrunkServer


class TrunkServerSerializer(serializers.ModelSerializer):
    """What any signed-in user needs to choose a trunk: no address, no error text of the server's side."""

    layer_range = serializers.CharField(read_only=True)
    free_sessions = serializers.IntegerField(read_only=True)

    class Meta:
        model = TrunkServer
        # An explicit list, never "__all__": a new secret column must not appear here by itself.
        fields = ["id", "name", "enabled", "draining", "status", "latency_ms", "model_id", "layer_range",
                  "max_sessions", "active_sessions", "free_sessions", "last_checked_at"]
        read_only_fields = fields


class StaffTrunkServerSerializer(TrunkServerSerializer):
    """The staff's view adds where the trunk listens and its last error."""

    class Meta(TrunkServerSerializer.Meta):
        fields = TrunkServerSerializer.Meta.fields + ["address", "last_error"]
        read_only_fields = fields


class ServedModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    trunks = serializers.IntegerField()
    free_sessions = serializers.IntegerField()
