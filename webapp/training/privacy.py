"""The leakage audit of a job: run by its worker, stored with the job, shown in words.

The worker plays the trunk owner (``splitcore.privacy.audit``) against a sample of the job's
own data at the job's cut and defenses, on its own machine, before the first hidden state
leaves it; with NoPeek on, it audits again at the end with the Bottom the job trained. The
reports are stored on the job (``Job.privacy_audit``) and reach the page, the API and the
model card.
"""

from __future__ import annotations

import logging

from django.conf import settings

from splitcore.data.formats import Example
from splitcore.privacy.attack_names import GRADIENTS, HIDDEN_STATES, channel_rate
from splitcore.privacy.audit import AuditConfig, AuditReport, audit_privacy
from splitcore.privacy.measured import (
    MAX_RECOMMENDED_COST,
    MeasuredPoint,
    measured_meta,
    measured_points,
    recommendation,
)
from splitcore.training.engines import SplitEngine

from .. import base_models
from .lease import Lease, LeaseLost
from .models import Job

log = logging.getLogger(__name__)

FIRST_STEP = "first_step"
LAST_STEP = "last_step"
MOMENTS = {FIRST_STEP: "before training, as the trunk receives the first steps",
           LAST_STEP: "after training, with the Bottom this job trained"}


def audit_job(job: Job, lease: Lease, engine: SplitEngine, tokenizer, examples: list[Example],
              moment: str) -> AuditReport | None:
    """Run the audit for ``moment`` and store it on the job (None when audits are off)."""
    if settings.PRIVACY_AUDIT_SAMPLE == 0:
        return None
    config = AuditConfig(sample=settings.PRIVACY_AUDIT_SAMPLE, max_tokens=min(128, job.max_seq_length),
                         seed=job.seed, strong=settings.PRIVACY_AUDIT_STRONG)
    # The Bottom this job runs: before training, the public one (or its private variant); after, the trained one.
    report = audit_privacy(base_models.client_model(job.base_model), tokenizer, examples,
                           job.privacy_settings(), engine.spec.n_bottom, engine.spec.n_top, config,
                           bottom_adapter=engine.bottom)
    stored = dict(Job.objects.values_list("privacy_audit", flat=True).get(pk=job.pk) or {})
    stored[moment] = report.to_dict()
    if not lease.mine().update(privacy_audit=stored):
        raise LeaseLost(f"job {job.pk} was taken over by another worker")
    job.privacy_audit = stored
    return report


def chain_note(job: Job) -> str:
    """For a job on a chain of trunks: which link each audit figure plays ("" for a job on one trunk).

    The hidden states the audit attacks are the Bottom's output, which only the first link receives; the
    gradients the Top sends back reach the last link first.
    """
    links = job.chain()
    if len(links) < 2:
        return ""
    first, last = links[0], links[-1]
    return (f"This job runs on a chain of {len(links)} trunk servers. The attacks on hidden states play the first "
            f"link, {first.trunk_name} ({first.blocks}), which receives the Bottom's output; the attack on gradients "
            f"plays the last link, {last.trunk_name} ({last.blocks}), which receives the gradients the Top sends "
            "back.")


def headline(rate: float) -> str:
    return f"a trunk owner holding the base model could read about {_percent(rate)} of your tokens"


def _percent(rate: float) -> str:
    return f"{rate:.0%}" if rate >= 0.01 or rate == 0 else "under 1%"


def audit_summary(job: Job) -> dict | None:
    """The stored audits in words, for the page, the live events and the model card."""
    stored = job.privacy_audit or {}
    moments = []
    for moment in (FIRST_STEP, LAST_STEP):
        if moment not in stored:
            continue
        try:
            report = AuditReport.from_dict(stored[moment])
        except ValueError:
            log.warning("job %s: unreadable %s audit", job.pk, moment)
            continue
        moments.append({
            "moment": moment, "when": MOMENTS[moment], "worst_rate": report.worst_rate,
            "headline": headline(report.worst_rate), "cut": f"{report.n_bottom} blocks before the trunk, "
                                                             f"{report.n_top} after it",
            "examples": report.examples, "strong": report.strong,
            "attacks": [{"name": r.name, "title": r.title, "rate": r.rate, "percent": f"{r.rate:.1%}",
                         "recovered": r.recovered, "total": r.total} for r in report.results],
        })
    return {"moments": moments, "chain": chain_note(job)} if moments else None


def audit_markdown(job: Job) -> str:
    """The model card's privacy section."""
    summary = audit_summary(job)
    if summary is None:
        return ("No leakage audit was run for this job. What a trunk owner could read was not measured; see "
                "docs/privacy.md for the measured figures of each setting.")
    lines = []
    for moment in summary["moments"]:
        lines.append(f"Audit {moment['when']} ({moment['cut']}, {moment['examples']} examples of the dataset): "
                     f"{moment['headline']}.\n")
        lines.append("| attack | tokens read |\n| --- | --- |")
        lines.extend(f"| {a['title']} | {a['percent']} ({a['recovered']} of {a['total']}) |"
                     for a in moment["attacks"])
        lines.append("")
    if summary["chain"]:
        lines.append(summary["chain"] + "\n")
    strong = all(moment["strong"] for moment in summary["moments"])
    lines.append("The audit plays an honest-but-curious trunk owner with the attacks above on a sample of the "
                 "training data" + ("" if strong else ", without its strong attacks (an inversion network trained "
                                                      "on more public text)")
                 + "; stronger attacks may read more. See docs/privacy.md.")
    return "\n".join(lines)


def measured_context(recommended: MeasuredPoint | None) -> dict:
    """The measured trade-off for the job form: the table (with each cut's share of a step on the user's
    workers, and the measured step time when the benchmark recorded it), its data for the page script, the
    ``recommended`` point the privacy fields start at (None: they start undefended), the site's ceiling on the
    workers' share and what it ruled out."""
    points = measured_points()
    if not points:
        return {}
    meta = measured_meta()
    ceiling = settings.PRIVACY_MAX_CLIENT_SHARE

    def present(point) -> dict:
        return {**point.to_dict(), "percents": {name: f"{rate:.1%}" for name, rate in point.rates.items()},
                "hidden_percent": f"{channel_rate(point.rates, HIDDEN_STATES):.1%}",
                "gradient_percent": f"{channel_rate(point.rates, GRADIENTS):.1%}",
                "worst_percent": f"{point.worst_rate:.1%}", "cost": f"{point.val_loss_change:+.1%}",
                "client_percent": f"{point.client_share:.0%}" if point.client_share is not None else "–",
                "step_time": f"{point.step_seconds:.2f} s" if point.step_seconds is not None else "–"}

    rows = [present(point) for point in points]
    script = {"points": rows, "model": meta.get("model"),
              "recommended": points.index(recommended) if recommended else None}
    return {"measured": rows, "measured_json": script, "max_cost": MAX_RECOMMENDED_COST * 100,
            "recommended": present(recommended) if recommended else None,
            "ceiling_percent": f"{ceiling:.0%}" if ceiling < 1 else "",
            "ceiling_note": ceiling_note(points, ceiling),
            "show_step_time": any(point.step_seconds is not None for point in points),
            "measured_on": f"{meta.get('model', 'the default model')} and the demo dataset {meta.get('data', '')}"}


def ceiling_note(points: tuple[MeasuredPoint, ...], ceiling: float) -> str:
    """What the site's ceiling on the workers' share kept the rule from choosing, and what it would have bought
    ("" when the ceiling changed nothing)."""
    rule = recommendation(points, max_client_share=ceiling)
    excluded, chosen = rule.excluded, rule.chosen
    if excluded is None:
        return ""
    reads = f"{excluded.worst_rate:.0%}" + (f" instead of {chosen.worst_rate:.0%}" if chosen else "")
    runs = (f"runs {excluded.client_share:.0%} of each step on your workers, above this site's {ceiling:.0%} ceiling"
            if excluded.client_share is not None else
            f"its share of each step on your workers is not known, so it cannot be shown to stay under this site's "
            f"{ceiling:.0%} ceiling")
    note = f"{excluded.name} would read {reads} but {runs}."
    if chosen is None:
        note += (f" No measured setting is within both the ceiling and the {MAX_RECOMMENDED_COST:.0%} limit on "
                 "validation loss, so the privacy fields start at the trunk's default cut without defenses.")
    return note
