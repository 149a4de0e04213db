"""Which trunks can take a job, which one gets it, and which base models can be trained."""

from __future__ import annotations

import math

from django.db.models import QuerySet

from splitcore.remote.trunk import SessionNeeds
from webapp.base_models import installed_models

from .models import TrunkServer


class NoTrunkAvailable(Exception):
    """No enabled trunk that passed its last health check serves the requested model."""


def healthy_trunks(model_id: str | None = None) -> QuerySet[TrunkServer]:
    """Enabled trunks, not draining, whose last check found them up (serving ``model_id`` when given)."""
    trunks = TrunkServer.objects.filter(enabled=True, draining=False, status=TrunkServer.Status.UP)
    if model_id is not None:
        trunks = trunks.filter(model_id=model_id)
    return trunks


def pick_trunk(model_id: str, cut: tuple[int | None, int | None] = (None, None), *,
               needs: SessionNeeds | None = None, exclude: tuple[int, ...] = ()) -> TrunkServer:
    """The healthy trunk for ``model_id`` (other than the ids in ``exclude``) that allows ``cut`` (Bottom,
    Top blocks; None: a trunk's default) and whose budgets take ``needs`` (None: anything), with the most
    free sessions; ties go to the lower latency, then the name.

    A trunk that looked full at its last check is still a candidate when nothing better exists:
    its session count is up to one check interval old, and a job waits for a free session.
    """
    candidates = list(healthy_trunks(model_id).exclude(pk__in=exclude))
    if not candidates:
        raise NoTrunkAvailable(_why_none(model_id))
    allowing = [trunk for trunk in candidates if trunk.allows_cut(*cut)]
    if not allowing:
        reasons = "; ".join(f"{trunk.name}: {trunk.cut_problem(*cut)}" for trunk in candidates)
        raise NoTrunkAvailable(f"no healthy trunk for '{model_id}' allows keeping {_cut_words(cut)} on the data "
                               f"owner's machine ({reasons})")
    candidates = [trunk for trunk in allowing if not trunk.budget_problems(needs)]
    if not candidates:
        reasons = "; ".join(f"{trunk.name} would refuse {'; '.join(trunk.budget_problems(needs).values())}"
                            for trunk in allowing)
        raise NoTrunkAvailable(f"no healthy trunk for '{model_id}' takes these settings ({reasons}); change them, "
                               "or ask an administrator for a trunk with larger budgets")
    return min(candidates, key=lambda trunk: (
        -trunk.free_sessions,
        trunk.latency_ms if trunk.latency_ms is not None else math.inf,
        trunk.name,
    ))


def _cut_words(cut: tuple[int | None, int | None]) -> str:
    bottom, top = cut
    return (f"{'the default number of' if bottom is None else bottom} blocks before the trunk and "
            f"{'the default number' if top is None else top} after it")


def served_models() -> list[str]:
    """Base models that can be trained: served by a healthy trunk AND installed in ``MODELS_DIR``."""
    served = set(healthy_trunks().values_list("model_id", flat=True))
    # Only listed directory names match, so a trunk's self-reported id never turns into a path here.
    return [model_id for model_id in installed_models() if model_id in served]


def served_model_summaries() -> list[dict]:
    """``served_models()`` with how many healthy trunks serve each and their free sessions in total."""
    models = served_models()
    summaries = {model_id: {"id": model_id, "trunks": 0, "free_sessions": 0} for model_id in models}
    for trunk in healthy_trunks().filter(model_id__in=models):
        summaries[trunk.model_id]["trunks"] += 1
        summaries[trunk.model_id]["free_sessions"] += trunk.free_sessions
    return [summaries[model_id] for model_id in models]


def _why_none(model_id: str) -> str:
    trunks = TrunkServer.objects.all()
    if not trunks.exists():
        return "no trunk server is registered: add one in the admin (Trunk servers), then run 'Check now'"
    if healthy_trunks(model_id).exists():
        names = ", ".join(healthy_trunks(model_id).values_list("name", flat=True))
        return f"no healthy trunk serves '{model_id}' besides {names}"
    for_model = trunks.filter(model_id=model_id)
    if for_model.exists():
        names = ", ".join(trunk.name for trunk in for_model)
        return (f"no healthy trunk serves '{model_id}': {names} served it but "
                f"{'is' if for_model.count() == 1 else 'are'} down, disabled or draining; start the trunk server, "
                f"enable it (or end its drain) on the fleet page and check it, or try again later")
    others = sorted(set(healthy_trunks().exclude(model_id="").values_list("model_id", flat=True)))
    serving = f"the healthy trunks serve {', '.join(others)}" if others else "no trunk is healthy right now"
    return (f"no trunk serves '{model_id}' ({serving}): start a trunk server with this base model "
            f"(python -m trunk_server --model <dir of {model_id}> ...) and add it in the admin, "
            f"or choose another base model")
