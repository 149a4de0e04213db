"""The measured price of each privacy setting (``benchmarks/privacy_tradeoff.py --save-measured``).

The figures are for the default model and the demo dataset; the job form shows them before a
job starts, next to the audit each job runs on its own data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from splitcore.privacy.settings import PrivacySettings

MEASURED_PATH = Path(__file__).with_name("measured_tradeoff.json")
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

    @property
    def worst_rate(self) -> float:
        return max(self.rates.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "privacy": self.privacy.to_dict(), "n_bottom": self.n_bottom,
                "n_top": self.n_top, "rates": dict(self.rates), "worst_rate": self.worst_rate,
                "val_loss_change": self.val_loss_change}


@lru_cache(maxsize=1)
def _measured() -> dict:
    return json.loads(MEASURED_PATH.read_text()) if MEASURED_PATH.is_file() else {"meta": {}, "rows": []}


def measured_meta() -> dict:
    """How the figures were measured: model, dataset, epochs, learning rate, audit sample."""
    return dict(_measured()["meta"])


def measured_points() -> tuple[MeasuredPoint, ...]:
    """Every measured setting, the undefended one first (empty when nothing was measured)."""
    rows = _measured()["rows"]
    if not rows:
        return ()
    base = rows[0]["val_loss"]
    return tuple(MeasuredPoint(name=row["name"], privacy=PrivacySettings.from_dict(row["privacy"]),
                               n_bottom=row["n_bottom"], n_top=row["n_top"], rates=dict(row["rates"]),
                               val_loss_change=row["val_loss"] / base - 1) for row in rows)


def recommended_point() -> MeasuredPoint | None:
    """The best compromise among the measured settings (None: nothing measured)."""
    return recommend(measured_points())


def recommend(points: tuple[MeasuredPoint, ...]) -> MeasuredPoint | None:
    """Of the settings that cost at most ``MAX_RECOMMENDED_COST`` validation loss, the one whose
    best attack reads the fewest tokens; on a tie, the one whose next best attack reads fewer,
    then the cheaper one."""
    affordable = [p for p in points if p.val_loss_change <= MAX_RECOMMENDED_COST]
    return min(affordable, key=lambda p: (sorted(p.rates.values(), reverse=True), p.val_loss_change),
               default=None)
