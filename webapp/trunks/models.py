"""Trunk servers the workers train against, with the health fields the checks fill in."""

from __future__ import annotations

from django.db import models

from splitcore.model.split_spec import CutBounds, blocks_words
from splitcore.remote.client import RetryPolicy, TrunkClient
from splitcore.remote.proto import trunk_pb2 as pb
from splitcore.remote.trunk import SessionNeeds

from ..byte_sizes import format_bytes

# The per-session budgets a trunk reports (the TrunkServer fields of the same names).
BUDGET_FIELDS = ("max_lora_rank", "max_micro_batches", "max_tokens_per_request", "max_positions", "max_kv_tokens",
                 "max_saved_graphs", "max_session_memory_bytes")


class TrunkServer(models.Model):
    class Status(models.TextChoices):
        UNKNOWN = "unknown", "unknown"
        UP = "up", "up"
        DOWN = "down", "down"

    name = models.CharField(max_length=100, unique=True)
    address = models.CharField(max_length=255, help_text="host:port of the trunk server's gRPC endpoint")
    # Write-only: forms and the API never show it back.
    token = models.CharField(max_length=512)
    use_tls = models.BooleanField("use TLS", default=False)
    tls_ca_certificate = models.TextField("TLS CA certificate", blank=True,
                                          help_text="PEM of the CA that signed the trunk's certificate (empty: the "
                                                    "system's roots)")
    enabled = models.BooleanField(default=True)
    # Draining: running jobs go on, nothing new opens a session here (jobs, generations), so the
    # trunk empties before maintenance. Set and cleared from the fleet page.
    draining = models.BooleanField(default=False, help_text="no new sessions: running jobs finish, new work goes "
                                                            "to other trunks")
    draining_since = models.DateTimeField(null=True, blank=True)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.UNKNOWN)
    latency_ms = models.FloatField(null=True, blank=True)
    model_id = models.CharField(max_length=200, blank=True)
    model_type = models.CharField(max_length=50, blank=True)
    weights_fingerprint = models.CharField(max_length=64, blank=True)
    num_layers = models.PositiveIntegerField(null=True, blank=True)
    trunk_start = models.PositiveIntegerField(null=True, blank=True)
    trunk_end = models.PositiveIntegerField(null=True, blank=True)
    # The layer ranges sessions may choose: any [start, end) with min_trunk_start <= start < end <= max_trunk_end.
    min_trunk_start = models.PositiveIntegerField(null=True, blank=True)
    max_trunk_end = models.PositiveIntegerField(null=True, blank=True)
    hidden_size = models.PositiveIntegerField(null=True, blank=True)
    max_sessions = models.PositiveIntegerField(null=True, blank=True)
    active_sessions = models.PositiveIntegerField(null=True, blank=True)
    version = models.CharField(max_length=50, blank=True)
    # Blank or NULL: the trunk did not report it (a trunk from before these fields).
    device = models.CharField(max_length=50, blank=True, help_text='where the frozen blocks run: "cpu", "cuda:0"')
    dtype = models.CharField(max_length=20, blank=True, help_text="the compute dtype of the frozen blocks")
    memory_total_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    memory_base_bytes = models.PositiveBigIntegerField(null=True, blank=True,
                                                       help_text="taken by the shared base weights")
    memory_sessions_bytes = models.PositiveBigIntegerField(null=True, blank=True,
                                                           help_text="taken by the open sessions")
    # Per-session budgets: a session that asks for more is refused.
    max_lora_rank = models.PositiveIntegerField(null=True, blank=True)
    max_micro_batches = models.PositiveIntegerField(null=True, blank=True)
    max_tokens_per_request = models.PositiveBigIntegerField(null=True, blank=True)
    max_positions = models.PositiveIntegerField(null=True, blank=True)
    max_kv_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    max_saved_graphs = models.PositiveIntegerField(null=True, blank=True)
    max_session_memory_bytes = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="what one session may hold: adapter, optimizer, saved graphs, kept replies")
    last_error = models.TextField(blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"

    @property
    def fleet_status(self) -> str:
        """What the fleet page shows: disabled or draining (an administrator's choice) before up/down/unknown
        (what the last check found)."""
        if not self.enabled:
            return "disabled"
        if self.draining:
            return "draining"
        return self.status

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

    @property
    def device_summary(self) -> str:
        """Where and in what dtype the trunk computes: "cuda:0 · bfloat16" ("" when it did not say)."""
        return " · ".join(part for part in (self.device, self.dtype) if part)

    @property
    def memory_summary(self) -> str:
        """The device's memory in use: "1.2 GiB of 80 GiB (base 1 GiB, sessions 204.8 MiB)" ("" when the
        trunk did not report it)."""
        if self.memory_total_bytes is None:
            return ""
        base, sessions = self.memory_base_bytes or 0, self.memory_sessions_bytes or 0
        return (f"{format_bytes(base + sessions)} of {format_bytes(self.memory_total_bytes)} "
                f"(base {format_bytes(base)}, sessions {format_bytes(sessions)})")

    def budget_problems(self, needs: SessionNeeds | None) -> dict[str, str]:
        """What ``needs`` asks beyond this trunk's per-session budgets as its last check recorded them (a
        budget it did not report: nothing; it judges that one itself when the session opens)."""
        if needs is None:
            return {}
        recorded = pb.InfoResponse(**{name: getattr(self, name) or 0 for name in BUDGET_FIELDS})
        return needs.problems(recorded)

    @property
    def cut_bounds(self) -> str:
        """The cuts this trunk allows, in words: "Bottom 1-28 blocks, Top at least 1"."""
        if self.num_layers is None or self.min_trunk_start is None or self.max_trunk_end is None:
            return ""
        return (f"keeps {self.min_trunk_start} or more blocks before the trunk and "
                f"{self.num_layers - self.max_trunk_end} or more after it on the data owner's machine")

    def cut_problem(self, n_bottom: int | None, n_top: int | None) -> str:
        """Why this trunk cannot serve a job that keeps ``n_bottom``/``n_top`` blocks on the data owner's
        machine (None: this trunk's default), or "" when it can."""
        if n_bottom is None and n_top is None:
            return ""  # every trunk serves its own default cut
        bounds = self.bounds
        if bounds is None:
            return "its last health check did not report its layers; run 'Check now' in the admin"
        try:
            spec = bounds.split(n_bottom, n_top)
        except ValueError as exc:
            return str(exc)
        if bounds.allows(spec.trunk_layers):
            return ""
        return f"it {self.cut_bounds}" if self.min_trunk_start is not None else "it serves its default cut only"

    def allows_cut(self, n_bottom: int | None, n_top: int | None) -> bool:
        return not self.cut_problem(n_bottom, n_top)

    @property
    def bounds(self) -> CutBounds | None:
        """The cuts this trunk allows as its last check recorded them (None: it reported no layers)."""
        if self.num_layers is None or self.trunk_start is None or self.trunk_end is None:
            return None
        # A trunk from before per-session ranges reports no bounds: it serves its default cut only.
        return CutBounds(num_layers=self.num_layers, default=range(self.trunk_start, self.trunk_end),
                         lowest=self.min_trunk_start or self.trunk_start,
                         highest=self.max_trunk_end or self.trunk_end)

    def layers_for(self, n_bottom: int | None, n_top: int | None) -> range | None:
        """The blocks this trunk runs for a job that keeps ``n_bottom``/``n_top`` blocks on the data owner's
        machine (None: this trunk's default), or None when its last check reported no layers or the cut
        leaves a part without a block."""
        bounds = self.bounds
        if bounds is None:
            return None
        try:
            return bounds.split(n_bottom, n_top).trunk_layers
        except ValueError:
            return None

    @property
    def served_blocks(self) -> str:
        """The blocks a session may run here, in words: "blocks 1-2 of 6" ("" when not reported)."""
        bounds = self.bounds
        if bounds is None:
            return ""
        return f"{blocks_words(range(bounds.lowest, bounds.highest))} of {bounds.num_layers}"

    def client(self, wire_encoding: str = "fp32", timeout_s: float = 120.0,
               retry: RetryPolicy = RetryPolicy()) -> TrunkClient:
        root = self.tls_ca_certificate.encode() if self.use_tls and self.tls_ca_certificate.strip() else None
        # Named after this record, so a TrunkError says which trunk (which link of a chain) failed.
        return TrunkClient(self.address, self.token, wire_encoding=wire_encoding, timeout_s=timeout_s, retry=retry,
                           root_certificates=root, use_tls=self.use_tls, name=self.name)


class HealthSample(models.Model):
    """One health check's figures, for the fleet page's charts; samples older than
    ``TRUNK_HEALTH_RETENTION_S`` are deleted as new ones come in.

    The counters are the trunk's own since it started (``uptime_s``): a rate is the difference
    between two samples of one run of the trunk. NULL: down at that check, or not reported (a trunk
    from before the counters).
    """

    trunk = models.ForeignKey(TrunkServer, on_delete=models.CASCADE, related_name="samples")
    checked_at = models.DateTimeField()
    up = models.BooleanField()
    latency_ms = models.FloatField(null=True)
    active_sessions = models.PositiveIntegerField(null=True)
    max_sessions = models.PositiveIntegerField(null=True)
    uptime_s = models.FloatField(null=True)
    tokens_processed = models.PositiveBigIntegerField(null=True)
    busy_s = models.FloatField(null=True)
    sessions_opened = models.PositiveBigIntegerField(null=True)
    memory_sessions_bytes = models.PositiveBigIntegerField(null=True)

    class Meta:
        ordering = ["checked_at", "id"]
        indexes = [models.Index(fields=["trunk", "checked_at"]), models.Index(fields=["checked_at"])]

    def __str__(self) -> str:
        return f"{self.trunk_id} at {self.checked_at:%Y-%m-%d %H:%M:%S}: {'up' if self.up else 'down'}"
