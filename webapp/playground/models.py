"""Generations of the playground: one prompt answered by a base model, with or without a job's adapter."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from splitcore.generation.local import GenerationSettings

MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**31 - 1


class Generation(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"
        STOPPED = "stopped", "stopped"  # by its owner; the text so far is kept

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.STOPPED)

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="generations")
    # None: the bare base model; else the base model with this job's adapter.
    job = models.ForeignKey("training.Job", on_delete=models.CASCADE, null=True, blank=True,
                            related_name="generations")
    base_model = models.CharField(max_length=200)
    # A comparison is the base model's generation and those started with it (the adapter's): they
    # point to it here. None on the base model's own, and on generations from before this was kept.
    paired_with = models.ForeignKey("self", on_delete=models.CASCADE, null=True, blank=True, related_name="paired",
                                    editable=False)
    prompt = models.TextField()
    chat = models.BooleanField(default=True, help_text="the prompt went through the tokenizer's chat template")
    max_new_tokens = models.PositiveIntegerField(default=64)
    temperature = models.FloatField(default=0.0)
    seed = models.PositiveIntegerField(default=0)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    output = models.TextField(blank=True)
    # Generated tokens, an end-of-sequence token included.
    token_count = models.PositiveIntegerField(default=0)
    error_message = models.TextField(blank=True)
    # The owner asked to stop it: the worker ends it after the current token (see runner.py).
    stop_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"generation {self.pk} ({self.label}, {self.status})"

    @property
    def label(self) -> str:
        return f"With adapter: {self.job.display_name}" if self.job_id is not None else "Base model"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def can_stop(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING) and not self.stop_requested

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed)
