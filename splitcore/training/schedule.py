"""Learning rate per optimizer step: linear warmup, then linear or cosine decay."""

from __future__ import annotations

import math


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str) -> float:
    """The lr of optimizer step ``step`` (1-based) of ``total_steps``.

    Warmup climbs to ``peak`` at step ``warmup_steps``; the first step after it runs at
    ``peak`` and the rate decays towards zero, reaching ``peak / (total - warmup)`` (linear)
    on the last step, so no step is wasted at a rate of zero.
    """
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    if step <= warmup_steps:
        return peak * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = (step - warmup_steps - 1) / decay_steps if decay_steps > 0 else 0.0
    progress = min(progress, 1.0)
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose linear or cosine")
