"""Which trunks can take a job, which one gets it (or which chain of them), and which base models can be trained.

A job runs on one trunk when a healthy one serves its cut (``pick_trunk``). Otherwise trunks of the
same model that serve different block ranges can form a chain (``place``): the one with the fewest
links, least loaded first, every link within its budgets, validated as the client will plan it
(``splitcore.model.split_spec.plan_chain``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from django.db.models import QuerySet

from splitcore.model.split_spec import ChainPlan, CutBounds, blocks_words, plan_chain
from splitcore.remote.trunk import SessionNeeds
from webapp.base_models import installed_models

from .models import TrunkServer

Cut = tuple[int | None, int | None]


class NoTrunkAvailable(Exception):
    """No enabled trunk that passed its last health check serves the requested model."""


def healthy_trunks(model_id: str | None = None) -> QuerySet[TrunkServer]:
    """Enabled trunks, not draining, whose last check found them up (serving ``model_id`` when given): where
    new work may go."""
    return serving_trunks(model_id).filter(draining=False)


def serving_trunks(model_id: str | None = None) -> QuerySet[TrunkServer]:
    """Enabled trunks whose last check found them up, draining ones included: where a job that already runs
    on one may go on (draining takes no new work; the work it has goes on)."""
    trunks = TrunkServer.objects.filter(enabled=True, status=TrunkServer.Status.UP)
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
    candidates = _candidates(model_id, exclude)
    if not candidates:
        raise NoTrunkAvailable(_why_none(model_id))
    return _best_single(model_id, candidates, cut, needs)


def _candidates(model_id: str, exclude: Collection[int]) -> list[TrunkServer]:
    return list(healthy_trunks(model_id).exclude(pk__in=list(exclude)))


def _load_key(trunk: TrunkServer) -> tuple:
    """Least loaded first: the most free sessions, then the lower latency, then the name."""
    return -trunk.free_sessions, trunk.latency_ms if trunk.latency_ms is not None else math.inf, trunk.name


def _best_single(model_id: str, candidates: list[TrunkServer], cut: Cut, needs: SessionNeeds | None) -> TrunkServer:
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
    return min(candidates, key=_load_key)


# ------------------------------------------------------------------ chains of trunks


@dataclass(frozen=True)
class Link:
    """One trunk of a placement and the blocks it runs (None: its default, when its check reported no layers)."""

    trunk: TrunkServer
    layers: range | None

    def describe(self) -> str:
        return f"{self.trunk.name} {blocks_words(self.layers)}" if self.layers else self.trunk.name


@dataclass(frozen=True)
class Placement:
    """Where a job's trunk blocks run: one trunk, or a chain of trunks in block order."""

    links: tuple[Link, ...]

    @classmethod
    def single(cls, trunk: TrunkServer, cut: Cut) -> Placement:
        return cls((Link(trunk, trunk.layers_for(*cut)),))

    @property
    def is_chain(self) -> bool:
        return len(self.links) > 1

    @property
    def trunks(self) -> list[TrunkServer]:
        return [link.trunk for link in self.links]

    def describe(self) -> str:
        """"trunk-a" for one trunk; "link 1 trunk-a blocks 1-2, link 2 trunk-b blocks 3-4" for a chain."""
        if not self.is_chain:
            return self.links[0].trunk.name
        return ", ".join(f"link {index} {link.describe()}" for index, link in enumerate(self.links, start=1))


def place(model_id: str, cut: Cut = (None, None), *, needs: SessionNeeds | None = None,
          exclude: Collection[int] = ()) -> Placement:
    """Where a job of ``model_id`` with ``cut`` and ``needs`` runs: the trunk ``pick_trunk`` chooses when one
    serves the cut, else the chain with the fewest links among the healthy trunks (other than ``exclude``)
    whose budgets take ``needs``; among chains of as many links, the one whose busiest link has the most
    free sessions, then the lowest latency in total, then the names.

    NoTrunkAvailable says why none can: the single trunk's reasons, and which blocks no healthy trunk
    serves (or why the trunks that serve them cannot form a chain).
    """
    candidates = _candidates(model_id, exclude)
    if not candidates:
        raise NoTrunkAvailable(_why_none(model_id))
    try:
        return Placement.single(_best_single(model_id, candidates, cut, needs), cut)
    except NoTrunkAvailable as single:
        refused_single = single
    chain = best_chain(candidates, cut, needs)
    if chain is not None:
        return chain
    if best_chain(candidates, cut, None) is not None:  # chains exist, but each has a link that refuses the settings
        refusals = "; ".join(f"{trunk.name} would refuse {'; '.join(trunk.budget_problems(needs).values())}"
                             for trunk in candidates if not trunk.allows_cut(*cut) and trunk.budget_problems(needs))
        raise NoTrunkAvailable(f"{refused_single}; a chain of healthy trunks serves this cut but takes these settings "
                               f"on no link ({refusals})") from None
    if any(trunk.allows_cut(*cut) for trunk in candidates):
        raise refused_single  # a trunk serves the cut: its budgets are the reason, as pick_trunk says
    why = why_no_chain(candidates, cut)
    raise NoTrunkAvailable(f"{refused_single}; {why}" if why else str(refused_single)) from None


def best_chain(trunks: Sequence[TrunkServer], cut: Cut, needs: SessionNeeds | None) -> Placement | None:
    """The chain of two or more of ``trunks`` for ``cut`` with the fewest links, least loaded first (see
    ``place``), among those whose budgets take ``needs``; None when no chain serves the cut."""
    usable = [trunk for trunk in trunks if trunk.bounds is not None and not trunk.budget_problems(needs)]
    found = []
    for group in _by_depth(usable).values():
        found.extend(_fewest_links(group, cut))
    if not found:
        return None
    fewest = min(len(chain) for chain, _ in found)
    chain, plan = min(((chain, plan) for chain, plan in found if len(chain) == fewest), key=lambda item: (
        max(_load_key(trunk)[0] for trunk in item[0]),  # the busiest link's free sessions, negated
        sum(_load_key(trunk)[1] for trunk in item[0]),
        tuple(trunk.name for trunk in item[0]),
    ))
    return Placement(tuple(Link(trunk, layers) for trunk, layers in zip(chain, plan.layers, strict=True)))


def substitute(links: Sequence[TrunkServer | None], index: int, candidates: Sequence[TrunkServer],
               cut: tuple[int, int], needs: SessionNeeds | None) -> Placement | None:
    """``links`` with the one at ``index`` replaced by the least loaded of ``candidates`` that takes ``needs``
    and fits that place of the chain for ``cut`` (None when none does, or another link reports no layers)."""
    others = [trunk for position, trunk in enumerate(links) if position != index]
    if any(trunk is None or trunk.bounds is None for trunk in others):
        return None
    for candidate in sorted(candidates, key=_load_key):
        if candidate in others or candidate.bounds is None or candidate.budget_problems(needs):
            continue
        chain = [*links[:index], candidate, *links[index + 1:]]
        plan = _plan(chain, cut)
        if plan is not None:
            return Placement(tuple(Link(trunk, layers) for trunk, layers in zip(chain, plan.layers, strict=True)))
    return None


def why_no_chain(trunks: Sequence[TrunkServer], cut: Cut) -> str:
    """Why ``trunks`` form no chain for ``cut``: the blocks none of them serves, or how their ranges fail to meet
    ("" when the cut leaves the trunk no block: the single trunk's reason says so)."""
    reasons = []
    for depth, group in sorted(_by_depth([trunk for trunk in trunks if trunk.bounds is not None]).items()):
        served = ", ".join(f"{trunk.name} {blocks_words(range(trunk.bounds.lowest, trunk.bounds.highest))}"
                           for trunk in sorted(group, key=lambda trunk: (trunk.bounds.lowest, trunk.name)))
        wanted = _wanted_blocks(group, cut, depth)
        if not wanted:
            continue
        missing = [block for block in wanted if not any(trunk.bounds.lowest <= block < trunk.bounds.highest
                                                         for trunk in group)]
        if missing:
            reasons.append(f"no healthy trunk serves {_blocks_list(missing)} of {depth} (they serve: {served})")
        else:
            reasons.append(f"the healthy trunks that serve {blocks_words(wanted)} of {depth} do not meet end to end "
                           f"({served}); each link of a chain must begin at the block where the one before it ends")
    if not reasons:
        return ""
    return "nor does a chain of them: " + "; ".join(reasons)


def _by_depth(trunks: Sequence[TrunkServer]) -> dict[int, list[TrunkServer]]:
    """Trunks by the depth of the model they serve: a chain's links all serve the same model."""
    groups: dict[int, list[TrunkServer]] = {}
    for trunk in trunks:
        groups.setdefault(trunk.num_layers, []).append(trunk)
    return groups


def _fewest_links(trunks: list[TrunkServer], cut: Cut) -> list[tuple[list[TrunkServer], ChainPlan]]:
    """Every chain of two or more of ``trunks`` (one model depth) for ``cut`` with the fewest links.

    Trunks with the same bounds can take each other's place, so the search runs over bounds and
    puts the least loaded trunk of each in its place; a link after the first must begin where the
    one before it ends (``plan_chain`` refuses overlaps).
    """
    best: dict[tuple, TrunkServer] = {}
    for trunk in sorted(trunks, key=_load_key):
        best.setdefault(_bounds_key(trunk.bounds), trunk)
    kinds = list(best.values())
    n_bottom = cut[0]
    frontier = [[trunk] for trunk in kinds
                if trunk.bounds.lowest <= (trunk.bounds.default.start if n_bottom is None else n_bottom)
                < trunk.bounds.highest]
    found = []
    while frontier and not found:
        extended = []
        for chain in frontier:
            plan = _plan(chain, cut)
            if plan is not None:
                if len(chain) > 1:
                    found.append((chain, plan))
                continue  # a chain that serves the cut is not made longer
            end = chain[-1].bounds.highest
            extended.extend([*chain, trunk] for trunk in kinds if trunk.bounds.lowest == end and trunk not in chain)
        frontier = extended
    return found


def _plan(chain: Sequence[TrunkServer], cut: Cut) -> ChainPlan | None:
    try:
        return plan_chain([trunk.bounds for trunk in chain], *cut, names=[trunk.name for trunk in chain])
    except ValueError:
        return None


def _bounds_key(bounds: CutBounds) -> tuple:
    return bounds.num_layers, bounds.lowest, bounds.highest, bounds.default.start, bounds.default.stop


def _wanted_blocks(trunks: list[TrunkServer], cut: Cut, depth: int) -> range:
    """The trunk blocks of ``cut`` (a side left to the trunks' defaults: the widest the trunks' defaults reach)."""
    n_bottom, n_top = cut
    start = min(trunk.bounds.default.start for trunk in trunks) if n_bottom is None else n_bottom
    stop = max(trunk.bounds.default.stop for trunk in trunks) if n_top is None else depth - n_top
    return range(start, max(start, stop))


def _blocks_list(blocks: list[int]) -> str:
    """[1, 2, 5] -> "blocks 1-2 and block 5"."""
    runs: list[range] = []
    for block in blocks:
        if runs and runs[-1].stop == block:
            runs[-1] = range(runs[-1].start, block + 1)
        else:
            runs.append(range(block, block + 1))
    words = [blocks_words(run) for run in runs]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _cut_words(cut: tuple[int | None, int | None]) -> str:
    bottom, top = cut
    return (f"{'the default number of' if bottom is None else bottom} blocks before the trunk and "
            f"{'the default number' if top is None else top} after it")


def served_models(*, draining: bool = False) -> list[str]:
    """Base models that can be trained: served by a healthy trunk AND installed in ``MODELS_DIR``; with
    ``draining``, also those served only by draining trunks (a form still offers them, and says why new work
    for them cannot start: ``draining_notice``)."""
    trunks = serving_trunks() if draining else healthy_trunks()
    served = set(trunks.values_list("model_id", flat=True))
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


def draining_notice(model_id: str | None, work: str) -> str:
    """Why new ``work`` ("jobs", "playground sessions") cannot start for ``model_id`` (None: for any model) when
    every trunk that is up for it is draining, naming them and what to do; "" when a healthy trunk serves it or
    none is up at all (then the reason is another one)."""
    if healthy_trunks(model_id).exists():
        return ""
    names = sorted(serving_trunks(model_id).filter(draining=True).values_list("name", flat=True))
    if not names:
        return ""
    several = len(names) > 1
    which = f"{', '.join(names[:-1])} and {names[-1]}" if several else names[0]
    server = "servers" if several else "server"
    up_for = f"up for {model_id}" if model_id else "up"
    verb, takes = ("are", "take") if several else ("is", "takes")
    pronoun = "they" if several else "it"
    return (f"{which}, the only trunk {server} {up_for}, {verb} draining for maintenance: {pronoun} "
            f"{takes} no new {work}, so none can start now. An administrator can end the drain on the fleet page "
            f"or start another trunk server; then try again.")


def _why_none(model_id: str) -> str:
    trunks = TrunkServer.objects.all()
    if not trunks.exists():
        return "no trunk server is registered: add one in the admin (Trunk servers), then run 'Check now'"
    draining = draining_notice(model_id, "sessions")
    if draining:
        return draining
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
