"""The measured price of each privacy setting (``benchmarks/privacy_tradeoff.py --save-measured``).

The figures are for the default model and the demo dataset; the job form shows them before a
job starts, next to the audit each job runs on its own data. Each setting's cut also splits the
compute of a step between the user's workers and the trunk (``splitcore.model.compute_share``),
counted from the measured model's config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from splitcore.model.compute_share import DEFAULT_CONTEXT, ModelCompute, model_compute
from splitcore.model.default_model import DEFAULT_MODEL_NAME
from splitcore.privacy.settings import PrivacySettings

MEASURED_PATH = Path(__file__).with_name("measured_tradeoff.json")
# The config.json of the default model, kept with the benchmarks that build it with random weights.
DEFAULT_MODEL_CONFIG_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "default_model_config.json"
# The most validation loss a recommended setting may cost, relative to the undefended run.
MAX_RECOMMENDED_COST = 0.02


@dataclass(frozen=True)
class MeasuredPoint:
    name: str
    privacy: PrivacySettings
    n_bottom: int
    n_top: int
    rates: dict  # attack name -> share of tokens read
    val_loss_change: float  # relative to the undefended run at the default cut
    # The share of a step's matmul work on the user's workers at this cut (None: the model's config is unknown).
    client_share: float | None = None
    step_seconds: float | None = None  # the measured mean training step time, when the benchmark recorded it
    # Whether the rates come from the audit with its stronger attacks (network, aligned map, gradient search);
    # False: an earlier audit of three attacks, which reads at most as much.
    strong_audit: bool = False

    @property
    def worst_rate(self) -> float:
        return max(self.rates.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "privacy": self.privacy.to_dict(), "n_bottom": self.n_bottom,
                "n_top": self.n_top, "rates": dict(self.rates), "worst_rate": self.worst_rate,
                "val_loss_change": self.val_loss_change, "client_share": self.client_share,
                "step_seconds": self.step_seconds, "strong_audit": self.strong_audit}


@dataclass(frozen=True)
class Recommendation:
    """What the rule chose, and what it would have chosen without the ceiling on the client's share when
    the ceiling ruled that out (``excluded``; None when the ceiling changed nothing)."""

    chosen: MeasuredPoint | None
    excluded: MeasuredPoint | None = None


@lru_cache(maxsize=1)
def _measured() -> dict:
    return json.loads(MEASURED_PATH.read_text()) if MEASURED_PATH.is_file() else {"meta": {}, "rows": []}


def measured_meta() -> dict:
    """How the figures were measured: model, dataset, epochs, learning rate, audit sample."""
    return dict(_measured()["meta"])


def measured_model_config(meta: Mapping[str, Any]) -> dict | None:
    """The config.json of the model the figures were measured on: the meta's own ``model_config`` when the
    benchmark recorded one, else the default model's (``DEFAULT_MODEL_CONFIG_PATH``) when the meta names it;
    None when neither is at hand."""
    if isinstance(meta.get("model_config"), Mapping):
        return dict(meta["model_config"])
    if meta.get("model") == DEFAULT_MODEL_NAME and DEFAULT_MODEL_CONFIG_PATH.is_file():
        return json.loads(DEFAULT_MODEL_CONFIG_PATH.read_text())
    return None


def measured_compute() -> ModelCompute | None:
    """The matmul work per token of the measured model's blocks and LM head, at the sequence length the
    settings were trained at (None: its config is unknown)."""
    meta = measured_meta()
    config = measured_model_config(meta)
    if config is None:
        return None
    return model_compute(config, context=int(meta.get("seq_len") or DEFAULT_CONTEXT))


def measured_points() -> tuple[MeasuredPoint, ...]:
    """Every measured setting, the undefended one first (empty when nothing was measured)."""
    rows = _measured()["rows"]
    if not rows:
        return ()
    base = rows[0]["val_loss"]
    compute = measured_compute()
    return tuple(MeasuredPoint(name=row["name"], privacy=PrivacySettings.from_dict(row["privacy"]),
                               n_bottom=row["n_bottom"], n_top=row["n_top"], rates=dict(row["rates"]),
                               # a row measured beside an earlier undefended run is compared with that run
                               val_loss_change=row["val_loss"] / row.get("baseline_val_loss", base) - 1,
                               client_share=compute.share(row["n_bottom"], row["n_top"]).client_share
                               if compute else None,
                               step_seconds=row.get("step_seconds"),
                               strong_audit=bool(row.get("strong_audit", False))) for row in rows)


def recommended_point(max_client_share: float | None = None) -> MeasuredPoint | None:
    """The best compromise among the measured settings (None: nothing measured, or nothing fits)."""
    return recommend(measured_points(), max_client_share=max_client_share)


def recommend(points: tuple[MeasuredPoint, ...], max_cost: float = MAX_RECOMMENDED_COST,
              max_client_share: float | None = None) -> MeasuredPoint | None:
    """Of the settings that cost at most ``max_cost`` validation loss and (given a ceiling) run at most
    ``max_client_share`` of a step on the user's workers, the one whose best attack reads the fewest
    tokens; on a tie, the one whose next best attack reads fewer, then the cheaper one. With a ceiling,
    a setting whose share is unknown is left out: it cannot be shown to stay under it. When some settings
    were measured with the audit's stronger attacks, only those are compared."""
    return recommendation(points, max_cost=max_cost, max_client_share=max_client_share).chosen


def recommendation(points: tuple[MeasuredPoint, ...], max_cost: float = MAX_RECOMMENDED_COST,
                   max_client_share: float | None = None) -> Recommendation:
    """``recommend``'s choice, with the setting the ceiling on the client's share ruled out (see Recommendation)."""
    if max_client_share is not None and not 0 < max_client_share <= 1:
        raise ValueError(f"max_client_share must be a share above 0 and at most 1, got {max_client_share!r}")
    # Rates are compared only between rows one audit measured: the stronger audit's, when any row has it (an
    # earlier row's figures read less because its audit tried less, not because its setting hides more).
    comparable = [p for p in points if p.strong_audit] or list(points)
    affordable = [p for p in comparable if p.val_loss_change <= max_cost]
    unbounded = _best(affordable)
    if max_client_share is None:
        return Recommendation(chosen=unbounded)
    chosen = _best([p for p in affordable if p.client_share is not None and p.client_share <= max_client_share])
    return Recommendation(chosen=chosen, excluded=unbounded if unbounded is not chosen else None)


def _best(points: list[MeasuredPoint]) -> MeasuredPoint | None:
    return min(points, key=lambda p: (sorted(p.rates.values(), reverse=True), p.val_loss_change), default=None)
