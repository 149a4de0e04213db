"""Trunk servers the workers train against, with the health fields the checks fill in."""

from __future__ import annotations

from django.db import models

from splitcore.trunk_client import RetryPolicy, TrunkClient


class TrunkServer(models.Model):
    class Status(models.TextChoices):
        UNKNOWN = "unknown", "unknown"
        UP = "up", "up"
        DOWN = "down", "down"

    name = models.CharField(max_length=100, unique=True)
    address = models.CharField(max_length=255, help_text="host:port of the trunk server's gRPC endpoint")
    # Write-only: forms and the API never show it back.
    token = models.CharField(max_length=512)
    use_tls = models.BooleanField(default=False)
    tls_ca_certificate = models.TextField(blank=True, help_text="PEM of the CA that signed the trunk's "
                                                                "certificate (empty: the system's roots)")
    enabled = models.BooleanField(default=True)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.UNKNOWN)
    latency_ms = models.FloatField(null=True, blank=True)
    model_id = models.CharField(max_length=200, blank=True)
    model_type = models.CharField(max_length=50, blank=True)
    weights_fingerprint = models.CharField(max_length=64, blank=True)
    num_layers = models.PositiveIntegerField(null=True, blank=True)
    trunk_start = models.PositiveIntegerField(null=True, blank=True)
    trunk_end = models.PositiveIntegerField(null=True, blank=True)
    hidden_size = models.PositiveIntegerField(null=True, blank=True)
    max_sessions = models.PositiveIntegerField(null=True, blank=True)
    active_sessions = models.PositiveIntegerField(null=True, blank=True)
    version = models.CharField(max_length=50, blank=True)
    last_error = models.TextField(blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"

    @property
    def free_sessions(self) -> int:
        if self.max_sessions is None or self.active_sessions is None:
            return 0
        return max(0, self.max_sessions - self.active_sessions)

    @property
    def layer_range(self) -> str:
        if self.trunk_start is None or self.trunk_end is None:
            return ""
        return f"{self.trunk_start}-{self.trunk_end - 1} of {self.num_layers}"

    def client(self, wire_encoding: str = "fp32", timeout_s: float = 120.0,
               retry: RetryPolicy = RetryPolicy()) -> TrunkClient:
        root = self.tls_ca_certificate.encode() if self.use_tls and self.tls_ca_certificate.strip() else None
        return TrunkClient(self.address, self.token, wire_encoding=wire_encoding, timeout_s=timeout_s, retry=retry,
                           root_certificates=root, use_tls=self.use_tls)
