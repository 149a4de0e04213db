"""The measured trade-off that ships with the code, and how the default setting is chosen from it."""

from __future__ import annotations

import pytest

from splitcore.privacy import PrivacySettings
from splitcore.privacy.measured import (
    MAX_RECOMMENDED_COST,
    MeasuredPoint,
    measured_points,
    recommend,
)


def point(name, rates, cost, **privacy) -> MeasuredPoint:
    names = ("learned_inversion", "exact_search", "gradient_labels")
    return MeasuredPoint(name=name, privacy=PrivacySettings(**privacy), n_bottom=2, n_top=2,
                         rates=dict(zip(names, rates)), val_loss_change=cost)


def test_the_recommendation_protects_first_within_the_cost_limit_then_is_cheap():
    undefended = point("undefended", (0.9, 0.98, 0.96), 0.0)
    deeper = point("deeper", (0.7, 0.9, 0.96), 0.005, bottom_layers=8)
    deeper_still = point("deeper still", (0.8, 0.92, 0.96), 0.001, bottom_layers=4)
    strong_but_dear = point("strong", (0.01, 0.02, 0.0), MAX_RECOMMENDED_COST + 0.01, private_bottom=3.0)
    assert recommend((undefended, deeper, deeper_still, strong_but_dear)) is deeper  # tie at 0.96: next is 0.9
    affordable_strong = point("affordable", (0.03, 0.04, 0.0), MAX_RECOMMENDED_COST, private_bottom=1.0)
    assert recommend((undefended, deeper, affordable_strong)) is affordable_strong
    assert recommend(()) is None
    assert recommend((strong_but_dear,)) is None


def test_the_shipped_measurements_cover_the_issue_s_settings():
    points = measured_points()
    assert points[0].name.startswith("undefended") and points[0].val_loss_change == 0.0
    cuts = {p.n_bottom for p in points if p.privacy == PrivacySettings(bottom_layers=p.privacy.bottom_layers)}
    assert {1, 2, 4, 8} <= cuts
    for field in ("hidden_noise", "grad_noise", "nopeek", "private_bottom"):
        assert any(getattr(p.privacy, field) > 0 for p in points), field
    assert any(not p.privacy.gradients_to_trunk for p in points)
    assert all(0.0 <= rate <= 1.0 for p in points for rate in p.rates.values())


@pytest.mark.parametrize("field", ["hidden_noise", "grad_noise"])
def test_noise_that_blunts_its_attack_costs_far_more_than_the_limit(field):
    """The measured reason noise is not the default: where it halves its attack, the loss pays dearly."""
    attack = "gradient_labels" if field == "grad_noise" else "exact_search"
    baseline = measured_points()[0]
    blunted = [p for p in measured_points() if getattr(p.privacy, field) > 0
               and p.rates[attack] < baseline.rates[attack] / 2]
    assert blunted and all(p.val_loss_change > MAX_RECOMMENDED_COST for p in blunted)
