"""What staff can do to a trunk from the fleet page; each action returns what to tell them.

- check: a health check now (the result is on the row, and in the message);
- enable / disable: a disabled trunk gets no new jobs and no health checks;
- drain / end the drain: a draining trunk takes no new sessions (no new job or generation picks
  it); its running jobs go on, and the page says when it is empty;
- move jobs: each running job checkpoints after its current step and continues on another
  healthy trunk of its model (the worker does the move, as it does for a lost trunk); a job on a
  chain of trunks gets another trunk in that link's place.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Q
from django.utils import timezone

from ..training import events, placement
from ..training.models import Job
from .fleet import counted
from .health import check_trunk
from .models import TrunkServer
from .selection import NoTrunkAvailable, Placement


@dataclass(frozen=True)
class Outcome:
    message: str
    ok: bool = True


def check(trunk: TrunkServer) -> Outcome:
    trunk = check_trunk(trunk)
    return Outcome(describe_check(trunk), ok=trunk.status == TrunkServer.Status.UP)


def describe_check(trunk: TrunkServer) -> str:
    """What a check found, in one line (the fleet page and the admin say the same)."""
    if trunk.status != TrunkServer.Status.UP:
        return f"Trunk {trunk.name}: down: {trunk.last_error}"
    device = f", {trunk.device_summary}" if trunk.device_summary else ""
    return (f"Trunk {trunk.name}: up, {trunk.latency_ms:.1f} ms, model {trunk.model_id}, layers "
            f"{trunk.layer_range}{device}, sessions {trunk.active_sessions}/{trunk.max_sessions}")


def enable(trunk: TrunkServer) -> Outcome:
    TrunkServer.objects.filter(pk=trunk.pk).update(enabled=True)
    return Outcome(f"Trunk {trunk.name} is enabled: it is checked again and new jobs may pick it once it is up.")


def disable(trunk: TrunkServer) -> Outcome:
    TrunkServer.objects.filter(pk=trunk.pk).update(enabled=False)
    running = _running(trunk).count()
    jobs = f" Its {counted(running, 'running job')} {'goes' if running == 1 else 'go'} on." if running else ""
    return Outcome(f"Trunk {trunk.name} is disabled: no new jobs and no health checks.{jobs}")


def drain(trunk: TrunkServer) -> Outcome:
    TrunkServer.objects.filter(pk=trunk.pk, draining=False).update(draining=True, draining_since=timezone.now())
    running = _running(trunk).count()
    if running:
        return Outcome(f"Trunk {trunk.name} is draining: no new sessions open there; its "
                       f"{counted(running, 'running job')} {'goes' if running == 1 else 'go'} on (or move "
                       f"{'it' if running == 1 else 'them'}). The page says when it is empty.")
    return Outcome(f"Trunk {trunk.name} is draining: no new sessions open there. No job runs on it; it is empty "
                   "once its last check counts no session.")


def end_drain(trunk: TrunkServer) -> Outcome:
    TrunkServer.objects.filter(pk=trunk.pk).update(draining=False, draining_since=None)
    return Outcome(f"Trunk {trunk.name} takes new sessions again.")


def move_jobs(trunk: TrunkServer) -> Outcome:
    """Ask each running job on ``trunk`` to move, when another healthy trunk can take it now (for a job on a
    chain of trunks: another trunk in that link's place, or else another placement of the whole job)."""
    moving, staying = [], []
    for job in _running(trunk):
        try:
            target = placement.move_off(job, trunk.pk)
        except NoTrunkAvailable as error:
            staying.append(f"job {job.pk} ({job.display_name}) stays: {error}")
            continue
        if Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(move_from=trunk):
            job.move_from = trunk
            events.publish_status(job)  # its page says it is moving
            moving.append(f"job {job.pk} ({job.display_name}) to {_destination(job, trunk, target)}")
    if not moving and not staying:
        return Outcome(f"No job runs on trunk {trunk.name}: nothing to move.", ok=False)
    parts = []
    if moving:
        parts.append(f"Moving off {trunk.name}: {'; '.join(moving)}. Each one saves a checkpoint after its current "
                     "step and continues there (the worker chooses again at that moment).")
    parts.extend(staying)
    return Outcome(" ".join(parts), ok=not staying)


def _destination(job: Job, trunk: TrunkServer, target: Placement) -> str:
    """Where a job moving off ``trunk`` goes: "b" for a job on one trunk; for a chain, the trunk that takes
    the link's place ("c in place of link 2") or the new placement."""
    links = job.chain()
    if not target.is_chain:
        return target.links[0].trunk.name
    kept = [link.trunk_id for link in links]
    if len(links) == len(target.links) and [t.pk for t in target.trunks if t.pk in kept] == \
            [pk for pk in kept if pk != trunk.pk]:
        position = kept.index(trunk.pk)
        return f"{target.links[position].trunk.name} in place of link {position + 1} of its chain"
    return f"a chain of {len(target.links)} trunk servers ({target.describe()})"


def _running(trunk: TrunkServer):
    """Running jobs with ``trunk`` as their trunk or as a link of their chain."""
    return Job.objects.filter(Q(trunk=trunk) | Q(links__trunk=trunk), status=Job.Status.RUNNING).distinct()


ACTIONS = {"check": check, "enable": enable, "disable": disable, "drain": drain, "end-drain": end_drain,
           "move-jobs": move_jobs}
# The buttons, in the order the fleet page shows them (fleet.available_actions says which apply).
LABELS = {"check": "Check now", "enable": "Enable", "disable": "Disable", "drain": "Drain",
          "end-drain": "End the drain", "move-jobs": "Move jobs"}
