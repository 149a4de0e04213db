"""How long a job will take, before it starts: its steps for a dataset, and step times measured on recent jobs.

The steps follow the trainer's own count (``TrainConfig.total_steps`` after the validation
split). The duration comes from jobs that already ran on the same base model (on the same
trunk when one is chosen): the compute time of their steps per example, from the
``elapsed_s`` of their metric points, and the time from their start to their first step
(loading the model, connecting, the leakage audit). No measured job, no duration: the
form says so rather than guess.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from django.conf import settings
from django.db.models import Max, Min

from . import presets
from .models import Job, MetricPoint

RECENT_JOBS = 20  # per base model: enough for a median, recent enough to reflect today's trunks
MIN_STEPS = 3  # a job with fewer steps says little about its step time


def training_examples(num_examples: int, val_fraction: float) -> int:
    """What the trainer keeps for training after holding out ``val_fraction`` (at least one example when > 0)."""
    held_out = max(1, round(num_examples * val_fraction)) if val_fraction > 0 else 0
    return max(0, num_examples - held_out)


def planned_steps(num_examples: int, *, val_fraction: float, epochs: float | None, max_steps: int | None,
                  batch_size: int, grad_accum_steps: int) -> int:
    """The optimizer steps a job will run: ``max_steps``, else ``epochs`` passes over the training examples."""
    if max_steps:
        return max_steps
    per_step = batch_size * grad_accum_steps
    return max(1, math.ceil((epochs or 1.0) * training_examples(num_examples, val_fraction) / per_step))


@dataclass(frozen=True)
class StepRate:
    """Measured on ``jobs`` recent jobs: seconds of compute per training example, and seconds from a job's
    start to its first step (None when no measured job started cleanly)."""

    seconds_per_example: float
    startup_s: float | None
    jobs: int

    def to_dict(self) -> dict:
        return asdict(self)

    def seconds(self, steps: int, examples_per_step: int) -> float:
        return (self.startup_s or 0.0) + steps * examples_per_step * self.seconds_per_example


def measured_rates() -> dict[str, dict[str, dict]]:
    """``{base_model: {"any" or trunk pk: StepRate.to_dict()}}`` from recent jobs of every user (only their
    timings are used)."""
    rates: dict[str, dict[str, list]] = {}
    jobs = (Job.objects.filter(current_step__gte=MIN_STEPS).exclude(status=Job.Status.QUEUED)
            .order_by("-created_at")[: RECENT_JOBS * 5])
    for job, per_example, startup in _timings(jobs):
        per_model = rates.setdefault(job.base_model, {})
        for key in ("any", str(job.trunk_id)) if job.trunk_id else ("any",):
            samples = per_model.setdefault(key, [])
            if len(samples) < RECENT_JOBS:
                samples.append((per_example, startup))
    return {model: {key: _rate(samples).to_dict() for key, samples in per_model.items()}
            for model, per_model in rates.items()}


def rate_for(base_model: str, trunk_id: int | None = None) -> StepRate | None:
    per_model = measured_rates().get(base_model, {})
    found = per_model.get(str(trunk_id)) if trunk_id else None
    found = found or per_model.get("any")
    return StepRate(**found) if found else None


def _timings(jobs):
    """(job, seconds per example, seconds to the first step or None) of each job with enough steps."""
    jobs = list(jobs)
    spans = (MetricPoint.objects.filter(job__in=jobs, kind=MetricPoint.Kind.TRAIN).values("job")
             .annotate(first=Min("step"), last=Max("step")))
    bounds = {row["job"]: (row["first"], row["last"]) for row in spans}
    wanted = [(job_id, step) for job_id, (first, last) in bounds.items() for step in (first, last)]
    points = {(p.job_id, p.step): p for p in MetricPoint.objects.filter(
        job__in=[job_id for job_id, _ in wanted], step__in={step for _, step in wanted}, kind=MetricPoint.Kind.TRAIN)}
    for job in jobs:
        first, last = bounds.get(job.pk, (None, None))
        if first is None or last - first < MIN_STEPS - 1:
            continue
        start, end = points.get((job.pk, first)), points.get((job.pk, last))
        if start is None or end is None or start.elapsed_s is None or end.elapsed_s is None:
            continue
        per_step = (end.elapsed_s - start.elapsed_s) / (last - first)
        if per_step <= 0:
            continue
        startup = None
        if first == 1 and job.attempts == 1 and job.started_at is not None:
            startup = max(0.0, (start.created_at - job.started_at).total_seconds() - start.elapsed_s)
        yield job, per_step / (job.batch_size * job.grad_accum_steps), startup


def _rate(samples: list[tuple[float, float | None]]) -> StepRate:
    startups = [startup for _, startup in samples if startup is not None]
    return StepRate(seconds_per_example=statistics.median(per_example for per_example, _ in samples),
                    startup_s=statistics.median(startups) if startups else None, jobs=len(samples))


def estimate_context(form) -> dict:
    """What the job form's script needs to estimate steps and duration as the user chooses: each offered
    dataset's size, the presets, the step limit and the measured rates per model and trunk."""
    datasets = form.fields["dataset"].queryset
    return {
        "datasets": {str(dataset.pk): {"name": dataset.name, "examples": dataset.num_examples} for dataset in datasets},
        "trunks": {str(trunk.pk): trunk.name for trunk in form.fields["trunk"].queryset},
        "presets": {preset.key: preset.to_dict() for preset in presets.PRESETS},
        "max_steps": settings.MAX_JOB_STEPS,
        "rates": measured_rates(),
    }
