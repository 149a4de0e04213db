"""Training jobs and the metric points they produce."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import models

from splitcore import LoraSettings
from splitcore.model.lora import ADAPTER_METHODS
from splitcore.model.split_spec import blocks_words
from splitcore.privacy import ClientSecret, PrivacySettings
from splitcore.privacy.client_secret import KEY_BYTES
from splitcore.remote.trunk import SessionNeeds
from splitcore.training import TrainConfig

NAME_MAX_LENGTH = 120
# What the pages call each key of Job.hyperparameters() (the job form's labels); the model card and
# training_args.json keep the keys.
HYPERPARAMETER_LABELS = {
    "base_model": "Base model",
    "adapter_method": "Adapter method",
    "use_dora": "DoRA",
    "use_rslora": "rsLoRA",
    "lora_r": "LoRA rank r",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "train_trunk_lora": "Train LoRA on the trunk too",
    "learning_rate": "Learning rate",
    "epochs": "Epochs",
    "max_steps": "Max steps",
    "batch_size": "Batch size",
    "grad_accum_steps": "Gradient accumulation",
    "max_seq_length": "Max sequence length",
    "warmup_steps": "Warmup steps",
    "lr_schedule": "Learning-rate schedule",
    "seed": "Seed",
    "val_fraction": "Validation fraction",
    "wire_encoding": "Wire encoding",
    "bottom_layers": "Blocks kept before the trunk",
    "top_layers": "Blocks kept after the trunk",
    "hidden_noise": "Noise on hidden states",
    "grad_noise": "Noise on gradients",
    "nopeek": "NoPeek weight",
    "private_bottom": "Private Bottom",
    "gradients_to_trunk": "Send gradients to the trunk",
}


def _scientific(number: float) -> str:
    """2e-04, 1.5e-05: a learning rate as people write it."""
    mantissa, exponent = f"{number:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


class JobQuerySet(models.QuerySet):
    def with_links(self) -> JobQuerySet:
        """Each job's links and their trunks in two more queries, for ``Job.chain()`` on many jobs."""
        return self.prefetch_related(models.Prefetch("links", queryset=JobLink.objects.select_related("trunk")))


class Job(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"
        CANCELLED = "cancelled", "cancelled"

    class Schedule(models.TextChoices):
        LINEAR = "linear", "linear"
        COSINE = "cosine", "cosine"

    class Wire(models.TextChoices):
        FP32 = "fp32", "fp32 (exact)"
        BF16 = "bf16", "bf16 (half the bytes)"
        FP16 = "fp16", "fp16 (half the bytes)"
        INT8 = "int8", "int8 (a quarter of the bytes)"

    class MergedStatus(models.TextChoices):
        NONE = "none", "not built"
        BUILDING = "building", "building"
        READY = "ready", "ready"
        FAILED = "failed", "failed"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    # The phase of a job running its steps (the status line then counts them).
    TRAINING_PHASE = "training"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    # Shown wherever a job is listed or picked; defaults to the dataset's name and the start time.
    name = models.CharField(max_length=NAME_MAX_LENGTH, blank=True)
    dataset = models.ForeignKey("datasets.Dataset", on_delete=models.SET_NULL, null=True, related_name="jobs")
    dataset_name = models.CharField(max_length=200)  # kept when the dataset is deleted
    base_model = models.CharField(max_length=200)
    # The examples trained through the tokenizer's chat template (the playground asks the same way);
    # None for jobs from before this was recorded.
    chat_format = models.BooleanField(null=True, blank=True, editable=False)
    trunk = models.ForeignKey("trunks.TrunkServer", on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="jobs")
    trunk_auto = models.BooleanField(default=True, help_text="pick the healthy trunk with the most free sessions")

    adapter_method = models.CharField(max_length=10, choices=list(ADAPTER_METHODS.items()), default="lora")
    use_dora = models.BooleanField(default=False)
    use_rslora = models.BooleanField(default=False)
    lora_r = models.PositiveIntegerField(default=8)
    lora_alpha = models.FloatField(default=16.0)
    lora_dropout = models.FloatField(default=0.05)
    train_trunk_lora = models.BooleanField(default=True)
    learning_rate = models.FloatField(default=2e-4)
    epochs = models.FloatField(null=True, blank=True)
    max_steps = models.PositiveIntegerField(null=True, blank=True)
    batch_size = models.PositiveIntegerField(default=4)
    grad_accum_steps = models.PositiveIntegerField(default=1)
    max_seq_length = models.PositiveIntegerField(default=512)
    warmup_steps = models.PositiveIntegerField(default=0)
    lr_schedule = models.CharField(max_length=10, choices=Schedule.choices, default=Schedule.LINEAR)
    seed = models.PositiveIntegerField(default=0)
    val_fraction = models.FloatField(default=0.1)
    wire_encoding = models.CharField(max_length=8, choices=Wire.choices, default=Wire.FP32)
    # Privacy (splitcore.privacy.PrivacySettings): the cut (None: the trunk's default) and the noise.
    bottom_layers = models.PositiveSmallIntegerField(null=True, blank=True)
    top_layers = models.PositiveSmallIntegerField(null=True, blank=True)
    hidden_noise = models.FloatField(default=0.0)
    grad_noise = models.FloatField(default=0.0)
    nopeek = models.FloatField(default=0.0)
    private_bottom = models.FloatField(default=0.0)
    gradients_to_trunk = models.BooleanField(default=True)
    # The leakage audit the worker ran on a sample of this job's data (AuditReport.to_dict()).
    privacy_audit = models.JSONField(null=True, blank=True, editable=False)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    error_message = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    # Set by staff on the fleet page ("move jobs"): the running job checkpoints after its current step
    # and continues on another healthy trunk of its model.
    move_from = models.ForeignKey("trunks.TrunkServer", on_delete=models.SET_NULL, null=True, blank=True,
                                  related_name="+", editable=False)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)
    # The running worker's lease: a token from its claim, renewed by heartbeats (see lease.py).
    lease_token = models.CharField(max_length=32, blank=True, editable=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # What a running job is doing before and between its steps, in a user's words (see runner.py).
    phase = models.CharField(max_length=200, blank=True, editable=False)
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(null=True, blank=True)
    train_examples = models.PositiveIntegerField(null=True, blank=True)
    val_examples = models.PositiveIntegerField(null=True, blank=True)
    last_loss = models.FloatField(null=True, blank=True)
    last_val_loss = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The merged model (base + adapter folded into one ordinary model, zipped), built on request by a
    # worker (merged.py). merged_requested_at also names the build: a task for an older request does nothing.
    merged_status = models.CharField(max_length=10, choices=MergedStatus.choices, default=MergedStatus.NONE,
                                     editable=False)
    merged_bytes = models.PositiveBigIntegerField(null=True, blank=True, editable=False)
    merged_error = models.TextField(blank=True, editable=False)
    merged_requested_at = models.DateTimeField(null=True, blank=True, editable=False)
    merged_started_at = models.DateTimeField(null=True, blank=True, editable=False)
    merged_built_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.display_name}, {self.status})"

    @property
    def display_name(self) -> str:
        """The job's name, or (for a job saved without one) its dataset's."""
        return self.name or self.dataset_name or f"job {self.pk}"

    # ------------------------------------------------------------ files

    @property
    def directory(self) -> Path:
        return Path(settings.JOBS_DIR) / str(self.pk)

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.directory / "adapter"

    @property
    def has_adapter(self) -> bool:
        return self.status == self.Status.SUCCEEDED and (self.adapter_dir / "adapter_model.safetensors").is_file()

    @property
    def merged_zip_path(self) -> Path:
        return self.directory / "merged-model.zip"

    @property
    def merged_expires_at(self):
        """When the built merged model is deleted (MERGED_RETENTION_HOURS after its build); None unless built."""
        built = self.merged_built_at or self.merged_requested_at
        if self.merged_status != self.MergedStatus.READY or built is None:
            return None
        return built + timedelta(hours=settings.MERGED_RETENTION_HOURS)

    @property
    def has_merged(self) -> bool:
        """Whether the merged model's zip is built and there to download."""
        return (self.status == self.Status.SUCCEEDED and self.merged_status == self.MergedStatus.READY
                and self.merged_zip_path.is_file())

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def can_cancel(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING) and not self.cancel_requested

    @property
    def status_line(self) -> str:
        """What a queued or running job is doing, for the line above its progress bar ("" once it ended)."""
        if self.status == self.Status.QUEUED:
            return "Queued: waiting for a free worker" + (" (it continues from its last checkpoint)"
                                                          if self.attempts else "")
        if self.status != self.Status.RUNNING:
            return ""
        if self.cancel_requested:
            return "Stopping after the current step…"
        if self.move_from_id is not None:
            return "Moving to another trunk server after the current step…"
        if not self.phase:
            return "Starting…"
        if self.phase == self.TRAINING_PHASE:
            total = f" of {self.total_steps}" if self.total_steps else ""
            return (f"Training: step {self.current_step}{total} done" if self.current_step
                    else "Training: starting step 1")
        return self.phase[:1].upper() + self.phase[1:] + "…"

    def chain(self) -> list[JobLink]:
        """The trunks the job runs (or ran) on, in block order; empty before it first connected. Reads
        ``with_links()``'s prefetch when there is one."""
        if "links" in getattr(self, "_prefetched_objects_cache", {}):
            return sorted(self.links.all(), key=lambda link: link.position)
        return list(self.links.select_related("trunk").order_by("position"))

    @property
    def can_resume(self) -> bool:
        return self.status in (self.Status.CANCELLED, self.Status.FAILED)

    # ------------------------------------------------------------ settings

    @property
    def trunk_lora_rank(self) -> int | None:
        """The rank of the adapter this job trains on the trunk; None when it trains none there (or IA3, rankless)."""
        return self.lora_r if self.train_trunk_lora and self.lora_settings().has_rank else None

    def session_needs(self) -> SessionNeeds:
        """What this job's trunk session will ask for, to hold against a trunk's budgets."""
        return SessionNeeds(batch_size=self.batch_size, seq_len=self.max_seq_length,
                            micro_batches=self.grad_accum_steps, lora_rank=self.trunk_lora_rank)

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(method=self.adapter_method, r=self.lora_r, alpha=self.lora_alpha,
                            dropout=self.lora_dropout, use_dora=self.use_dora, use_rslora=self.use_rslora)

    def privacy_settings(self) -> PrivacySettings:
        return PrivacySettings(bottom_layers=self.bottom_layers, top_layers=self.top_layers,
                               hidden_noise=self.hidden_noise, grad_noise=self.grad_noise, nopeek=self.nopeek,
                               private_bottom=self.private_bottom, gradients_to_trunk=self.gradients_to_trunk)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            lora=self.lora_settings(), train_trunk_lora=self.train_trunk_lora, learning_rate=self.learning_rate,
            max_steps=self.max_steps, epochs=None if self.max_steps else (self.epochs or 1.0),
            batch_size=self.batch_size, grad_accum=self.grad_accum_steps, seq_len=self.max_seq_length,
            warmup_steps=self.warmup_steps, schedule=self.lr_schedule, seed=self.seed,
            val_fraction=self.val_fraction, eval_every=0, checkpoint_every=settings.JOB_CHECKPOINT_EVERY,
            wire_encoding=self.wire_encoding, privacy=self.privacy_settings(),
        )

    def client_secret(self) -> ClientSecret:
        """The key the workers derive this job's trunk seed, noise and private Bottom from: the job's own
        (``JobSecret``), or for a job created before jobs had one, the site's key from SECRET_KEY (its
        checkpoints record that key's fingerprint, so it keeps resuming)."""
        try:
            stored = self.secret
        except JobSecret.DoesNotExist:
            return site_client_secret()
        return stored.client_secret()

    def hyperparameters(self) -> dict:
        """What a user set, for the model card, training_args.json and run comparison."""
        return {
            "base_model": self.base_model, "adapter_method": self.adapter_method, "use_dora": self.use_dora,
            "use_rslora": self.use_rslora, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout, "train_trunk_lora": self.train_trunk_lora,
            "learning_rate": self.learning_rate, "epochs": self.epochs, "max_steps": self.max_steps,
            "batch_size": self.batch_size, "grad_accum_steps": self.grad_accum_steps,
            "max_seq_length": self.max_seq_length, "warmup_steps": self.warmup_steps,
            "lr_schedule": self.lr_schedule, "seed": self.seed, "val_fraction": self.val_fraction,
            "wire_encoding": self.wire_encoding, "bottom_layers": self.bottom_layers,
            "top_layers": self.top_layers, "hidden_noise": self.hidden_noise, "grad_noise": self.grad_noise,
            "nopeek": self.nopeek, "private_bottom": self.private_bottom,
            "gradients_to_trunk": self.gradients_to_trunk,
        }

    def labelled_hyperparameters(self) -> list[tuple[str, str]]:
        """(label, value) pairs of hyperparameters() in its order, as the pages show them: yes/no, "–" for
        none, a choice's description, the learning rate in scientific notation."""
        pairs = []
        for name, value in self.hyperparameters().items():
            if value is None:
                shown = "–"
            elif isinstance(value, bool):
                shown = "yes" if value else "no"
            elif name == "learning_rate":
                shown = _scientific(value)
            elif isinstance(value, float):
                shown = f"{value:g}"
            else:
                shown = str(dict(self._meta.get_field(name).choices or ()).get(value, value))
            pairs.append((HYPERPARAMETER_LABELS.get(name, name), shown))
        return pairs


def site_client_secret() -> ClientSecret:
    """The one key every job shared before each job had its own: derived from SECRET_KEY, so only jobs
    created before ``JobSecret`` use it (to resume from their checkpoints)."""
    return ClientSecret.from_text(settings.SECRET_KEY, "splitlearn-studio client secret")


class JobSecret(models.Model):
    """A job's own random key, drawn when the job is created and kept on the site's side only.

    The workers derive the job's trunk seed, its noise on both channels and its private Bottom
    from it (``Job.client_secret()``); the trunk is sent derived seeds, never the key. No
    serializer, page, admin, model card, training_args.json or download carries it. Resuming the
    job (on any worker, on another trunk or chain link) uses the same key; a new job draws a new one.
    """

    job = models.OneToOneField(Job, on_delete=models.CASCADE, primary_key=True, related_name="secret",
                               editable=False)
    key = models.BinaryField(max_length=KEY_BYTES, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:  # never the key
        return f"key of job {self.job_id} ({self.client_secret()!r})"

    @classmethod
    def draw(cls, job: Job) -> JobSecret:
        """Store a fresh random key for ``job`` (saved, without one yet)."""
        return cls.objects.create(job=job, key=secrets.token_bytes(KEY_BYTES))

    def client_secret(self) -> ClientSecret:
        return ClientSecret(bytes(self.key))


class JobLink(models.Model):
    """One trunk a job runs on, and its blocks: a job on one trunk has one link, a job on a chain of
    trunks one per link, in block order (``position`` 0 receives the Bottom's output).

    The runner records them when it connects (``Job.trunk`` is the first link's trunk) and keeps
    them after the job ends, so its page says where it ran. A resumed job starts from them.
    """

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="links")
    position = models.PositiveSmallIntegerField()
    trunk = models.ForeignKey("trunks.TrunkServer", on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="job_links")
    trunk_name = models.CharField(max_length=100)  # kept when the trunk's record is deleted
    # The blocks this link runs, first and last included (NULL: the trunk's check reported no layers).
    first_block = models.PositiveSmallIntegerField(null=True, blank=True)
    last_block = models.PositiveSmallIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["job", "position"]
        constraints = [models.UniqueConstraint(fields=["job", "position"], name="one_link_per_position")]

    def __str__(self) -> str:
        return f"job {self.job_id} link {self.number}: {self.trunk_name} {self.blocks}".rstrip()

    @property
    def number(self) -> int:
        """The link's number as the pages and logs say it: link 1 is the first."""
        return self.position + 1

    @property
    def layers(self) -> range | None:
        if self.first_block is None or self.last_block is None:
            return None
        return range(self.first_block, self.last_block + 1)

    @property
    def blocks(self) -> str:
        """"blocks 1-2" ("" when not known)."""
        return blocks_words(self.layers) if self.layers is not None else ""

    @property
    def state(self) -> str:
        """The trunk's state on the fleet page (up, down, draining, disabled, unknown), or "removed" when its
        record was deleted."""
        return self.trunk.fleet_status if self.trunk is not None else "removed"


class MetricPoint(models.Model):
    class Kind(models.TextChoices):
        TRAIN = "train", "train"
        EVAL = "eval", "eval"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metrics")
    step = models.PositiveIntegerField()
    kind = models.CharField(max_length=5, choices=Kind.choices)
    loss = models.FloatField(null=True)
    val_loss = models.FloatField(null=True)
    lr = models.FloatField(null=True)
    grad_norm = models.FloatField(null=True)
    tokens_per_s = models.FloatField(null=True)
    wire_bytes = models.PositiveBigIntegerField(null=True)
    elapsed_s = models.FloatField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["step", "kind"]
        constraints = [models.UniqueConstraint(fields=["job", "step", "kind"], name="one_point_per_step_and_kind")]

    def as_dict(self) -> dict:
        if self.kind == self.Kind.EVAL:
            return {"step": self.step, "kind": self.kind, "val_loss": self.val_loss}
        return {"step": self.step, "kind": self.kind, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens_per_s": self.tokens_per_s, "wire_bytes": self.wire_bytes, "elapsed_s": self.elapsed_s}


class JobLog(models.Model):
    """What happened to a job, in words a user reads in the log tail."""

    class Level(models.TextChoices):
        INFO = "info", "info"
        WARNING = "warning", "warning"
        ERROR = "error", "error"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="logs")
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["id"]

    def as_dict(self) -> dict:
        return {"id": self.pk, "level": self.level, "message": self.message, "time": self.created_at.isoformat()}
