"""Where a job's trunk blocks run: one trunk or a chain of trunks, chosen, kept and recorded.

A new job is placed by ``trunks.selection.place``. Once it has run somewhere, its links
(``JobLink``) are where it continues: after a lost trunk, a restart of its worker or a resume,
it goes back to them while they are healthy. A link that is lost, or that staff move the job
off, is replaced by a trunk that fits the same place in the chain at the same cut (the job
continues from a checkpoint that splits back by block); the whole chain is placed again only
when no such trunk exists.
"""

from __future__ import annotations

from collections.abc import Collection

from ..trunks.models import TrunkServer
from ..trunks.selection import Link, NoTrunkAvailable, Placement, healthy_trunks, place, serving_trunks, substitute
from .models import Job, JobLink


def recorded(job: Job) -> Placement | None:
    """The links the job ran on, as a placement; None before it first connected or when one of their trunks
    was deleted."""
    links = job.chain()
    if not links or any(link.trunk is None for link in links):
        return None
    return Placement(tuple(Link(link.trunk, link.layers) for link in links))


def resolved_cut(job: Job) -> tuple[int | None, int | None]:
    """The cut the job ran at (its checkpoints are of this cut): read from its links when they say, else the
    job's own setting (None: a trunk's default)."""
    links = job.chain()
    if links:
        first, last = links[0], links[-1]
        depth = last.trunk.num_layers if last.trunk is not None else None
        if first.first_block is not None and last.last_block is not None and depth is not None:
            return first.first_block, depth - last.last_block - 1
    return job.bottom_layers, job.top_layers


def continue_on(job: Job, avoid: Collection[int] = ()) -> Placement:
    """Where the job runs now: its recorded links while their trunks serve (a draining trunk goes on with the
    jobs it has) and are not in ``avoid`` (trunks that did not answer), with each other link replaced when a
    trunk can take its place; a fresh placement for a job that never connected. When nothing can replace a
    trunk in ``avoid``, the job waits for its own trunks (they may answer again)."""
    chain = recorded(job)
    if chain is not None:
        serving = set(serving_trunks(job.base_model).values_list("pk", flat=True))
        leaving = {trunk.pk for trunk in chain.trunks if trunk.pk in avoid or trunk.pk not in serving}
        if not leaving:
            return chain
        try:
            return replace(job, chain, leaving, exclude=set(avoid) | leaving)
        except NoTrunkAvailable:
            return chain
    cut, needs = resolved_cut(job), job.session_needs()
    try:
        return place(job.base_model, cut, needs=needs, exclude=avoid)
    except NoTrunkAvailable:
        if not avoid:
            raise
        return place(job.base_model, cut, needs=needs)


def move_off(job: Job, trunk_id: int, avoid: Collection[int] = ()) -> Placement:
    """Where the job continues without the trunk ``trunk_id`` (staff asked it to move off): only that link
    is replaced when a trunk fits its place, else the job is placed again at its cut. NoTrunkAvailable
    (with the reason) when no trunk can take it."""
    chain = recorded(job)
    exclude = {trunk_id, *avoid}
    if chain is not None and trunk_id in {trunk.pk for trunk in chain.trunks}:
        return replace(job, chain, {trunk_id}, exclude=exclude)
    return place(job.base_model, resolved_cut(job), needs=job.session_needs(), exclude=exclude)


def replace(job: Job, chain: Placement, leaving: Collection[int], exclude: Collection[int]) -> Placement:
    """``chain`` without the trunks in ``leaving``: each of their links taken by a healthy trunk (not in
    ``exclude``) that fits its place at the job's cut, else the job placed again at that cut."""
    cut, needs = resolved_cut(job), job.session_needs()
    candidates = list(healthy_trunks(job.base_model).exclude(pk__in=list(exclude)))
    trunks: list[TrunkServer | None] = chain.trunks
    if chain.is_chain and None not in cut:
        replaced = Placement(chain.links)
        for index, trunk in enumerate(trunks):
            if trunk.pk not in leaving:
                continue
            replaced = substitute(replaced.trunks, index, candidates, cut, needs)
            if replaced is None:
                break
        if replaced is not None:
            return replaced
    return place(job.base_model, cut, needs=needs, exclude=exclude)


def record(job: Job, placement: Placement) -> None:
    """Store where the job runs: its links, and the first link's trunk as ``Job.trunk``."""
    JobLink.objects.filter(job=job).delete()
    JobLink.objects.bulk_create([
        JobLink(job=job, position=index, trunk=link.trunk, trunk_name=link.trunk.name,
                first_block=link.layers.start if link.layers else None,
                last_block=link.layers.stop - 1 if link.layers else None)
        for index, link in enumerate(placement.links)])
    first = placement.links[0].trunk
    if job.trunk_id != first.pk:
        Job.objects.filter(pk=job.pk).update(trunk=first)
        job.trunk = first
