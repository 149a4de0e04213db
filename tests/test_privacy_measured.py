"""The measured trade-off that ships with the code, and how the default setting is chosen from it."""

from __future__ import annotations

import pytest

from splitcore.privacy import PrivacySettings
from splitcore.privacy.measured import (
    MAX_RECOMMENDED_COST,
    MeasuredPoint,
    Recommendation,
    measured_meta,
    measured_model_config,
    measured_points,
    recommend,
    recommendation,
)


def point(name, rates, cost, client_share=0.3, **privacy) -> MeasuredPoint:
    names = ("learned_inversion", "exact_search", "gradient_labels")
    return MeasuredPoint(name=name, privacy=PrivacySettings(**privacy), n_bottom=2, n_top=2,
                         rates=dict(zip(names, rates)), val_loss_change=cost, client_share=client_share)


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


def test_a_ceiling_on_the_client_s_share_leaves_out_the_settings_above_it_and_names_the_one_it_ruled_out():
    undefended = point("undefended", (0.9, 0.98, 0.96), 0.0, client_share=0.31)
    deep = point("deep", (0.74, 0.89, 0.15), 0.001, client_share=0.84, bottom_layers=8, top_layers=16)
    deeper = point("deeper", (0.8, 0.92, 0.96), 0.002, client_share=0.36, bottom_layers=4)
    unknown = point("unknown share", (0.5, 0.5, 0.5), 0.0, client_share=None)
    points = (undefended, deep, deeper)
    assert recommend(points) is deep  # without a ceiling: the fewest tokens read
    assert recommendation(points) == Recommendation(chosen=deep)
    assert recommendation(points, max_client_share=0.35) == Recommendation(chosen=undefended, excluded=deep)
    assert recommend(points, max_client_share=0.36) is deeper  # at the ceiling is within it
    assert recommendation(points, max_client_share=0.9) == Recommendation(chosen=deep)  # the ceiling changed nothing
    # A share that is not known cannot be shown to stay under a ceiling; without one it counts as before.
    assert recommend((*points, unknown)) is unknown
    assert recommendation((*points, unknown), max_client_share=0.35) == Recommendation(chosen=undefended,
                                                                                      excluded=unknown)
    # The cost limit still applies first; nothing under both limits: no recommendation, and what was ruled out.
    assert recommend(points, max_cost=0.0) is undefended
    assert recommendation((deep,), max_client_share=0.35) == Recommendation(chosen=None, excluded=deep)


@pytest.mark.parametrize("ceiling", [0.0, -0.1, 1.5, float("nan")])
def test_a_ceiling_that_is_not_a_share_is_refused(ceiling):
    with pytest.raises(ValueError, match="max_client_share must be a share above 0 and at most 1"):
        recommend((point("any", (0.9, 0.9, 0.9), 0.0),), max_client_share=ceiling)


def test_the_shipped_measurements_know_each_cut_s_share_of_the_client_s_compute():
    """The measured model's config is found from the meta; the default cut keeps under a third of each step on the
    client, Bottom 8 + Top 16 over four fifths, and the site's default ceiling of 35% rules the deep cut out."""
    assert measured_model_config(measured_meta())["num_hidden_layers"] == 30
    shares = {(p.n_bottom, p.n_top): p.client_share for p in measured_points()}
    assert shares[(2, 2)] == pytest.approx(0.31, abs=0.01)
    assert shares[(8, 16)] == pytest.approx(0.84, abs=0.01)
    assert shares[(1, 2)] < shares[(2, 2)] < shares[(4, 2)]
    chosen = recommendation(measured_points(), max_client_share=0.35)
    assert chosen.chosen.client_share <= 0.35
    if chosen.excluded is not None:  # what the ceiling ruled out runs more of the step and reads less
        assert chosen.excluded.client_share > 0.35 and chosen.excluded.worst_rate < chosen.chosen.worst_rate


def test_the_measured_model_s_config_may_come_with_the_figures():
    config = {"model_type": "gpt2", "n_layer": 4}
    assert measured_model_config({"model": "anything", "model_config": config}) == config
    assert measured_model_config({"model": "a model nobody described"}) is None


def test_the_shipped_rows_say_which_audit_measured_them():
    """Rows re-measured with the stronger attacks carry them all; an earlier row holds three attacks and says so."""
    from splitcore.privacy.attack_names import ATTACK_TITLES, GRADIENT_SEARCH, NETWORK_INVERSION

    points = measured_points()
    strong = [p for p in points if p.strong_audit]
    assert points[0].strong_audit, "the baseline every cost is measured against was re-measured"
    for p in strong:
        assert set(p.rates) == set(ATTACK_TITLES), p.name
        assert p.step_seconds is not None and p.step_seconds > 0, p.name
    for p in points:
        if not p.strong_audit:
            assert NETWORK_INVERSION not in p.rates and GRADIENT_SEARCH not in p.rates, p.name


def test_the_rule_compares_only_the_rows_the_stronger_audit_measured_when_there_are_some():
    """An earlier audit read less because it tried less: its rows must not look safer than re-measured ones."""
    from dataclasses import replace

    strong_undefended = replace(point("undefended", (0.9, 1.0, 0.99), 0.0), strong_audit=True)
    earlier_looks_better = point("earlier", (0.5, 0.6, 0.5), 0.001)
    assert recommend((strong_undefended, earlier_looks_better)) is strong_undefended
    assert recommend((point("a", (0.9, 1.0, 0.99), 0.0), earlier_looks_better)) is earlier_looks_better
