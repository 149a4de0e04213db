"""Running one job in a worker: claim it, train through its trunk (or its chain of trunks), record what happens.

A job is claimed with a conditional UPDATE (queued -> running) that hands the worker a
lease (see lease.py), so a redelivered task message never runs a job twice, and a job
whose worker died is queued again by the sweep. A job with a checkpoint resumes from it;
so does a job whose trunk server (or one link of its chain) is lost mid-run, once the trunk
answers again or another healthy trunk can take its place (see placement.py). Metrics
are stored as rows as they happen. Errors end the job as ``failed`` with a message that
says what happened and what to do; the checkpoint stays for a resume.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from splitcore.data.formats import DatasetFormatError, parse_dataset
from splitcore.model.split_spec import blocks_words
from splitcore.remote.client import TrunkClient
from splitcore.remote.errors import Fault, TrunkError
from splitcore.training import (
    CheckpointSaved,
    EvalMetrics,
    SplitEngine,
    SplitTrainer,
    StepMetrics,
    TrainerEvent,
    TrainingDiverged,
    list_checkpoints,
)
from splitcore.training.batches import prepare_training_data
from splitcore.training.checkpoints import read_checkpoint_state

from .. import base_models
from ..trunks import fleet
from ..trunks.models import TrunkServer
from ..trunks.selection import Link, NoTrunkAvailable, Placement
from . import events, placement, privacy
from .lease import Lease, LeaseLost, claim
from .models import Job, JobLog, MetricPoint

log = logging.getLogger(__name__)

CAPACITY_POLL_S = 2.0
# A trunk that stopped answering or forgot the job's session (it restarted) can be waited for.
# A job continues from its checkpoint after these (the trunk came back, or a session was opened anew).
TRUNK_LOST = (Fault.LOST, Fault.RETRYABLE, Fault.SESSION_GONE)


class JobFailed(Exception):
    """Ends a job as failed with this message for the user."""


class JobCancelled(Exception):
    """The user cancelled the job before training started (e.g. while it waited for a trunk)."""


def run_job(job_id: int) -> str | None:
    """Run a queued job to its end; returns the final status (None when it was not ours to run)."""
    token = claim(job_id)
    if token is None:
        log.info("job %s is not queued (taken by another worker, cancelled or gone); skipping", job_id)
        return None
    job = Job.objects.get(pk=job_id)
    events.job_log(job, f"started on worker {job.worker} (attempt {job.attempts})")
    set_phase(job, "preparing the examples")
    with Lease(job_id, token) as lease:
        try:
            status = _train(job, lease)
        except JobFailed as failure:
            status = _finish(job, lease, Job.Status.FAILED, str(failure))
        except JobCancelled:
            status = _finish(job, lease, Job.Status.CANCELLED, "cancelled while it waited for a trunk server")
        except LeaseLost:
            log.warning("job %s: another worker took it over (this one was taken for dead); stopped", job_id)
            return None
        except Exception as exc:  # noqa: BLE001 - any crash must end the job with a message, not leave it running
            log.exception("job %s crashed", job_id)
            status = _finish(job, lease, Job.Status.FAILED,
                             f"unexpected error in the worker: {type(exc).__name__}: {exc}")
    return status


def set_phase(job: Job, phase: str) -> None:
    """What the job is doing now (before and between steps), stored and sent live to its page."""
    Job.objects.filter(pk=job.pk).update(phase=phase)
    job.phase = phase
    events.publish_status(job)


def _finish(job: Job, lease: Lease, status: str, message: str = "") -> str | None:
    if not lease.mine().update(status=status, error_message=message, finished_at=timezone.now(), phase="",
                               cancel_requested=False, move_from=None, lease_token="", updated_at=timezone.now()):
        log.warning("job %s: not recording %s, another worker holds it now", job.pk, status)
        return None
    job.refresh_from_db()
    level = JobLog.Level.ERROR if status == Job.Status.FAILED else JobLog.Level.INFO
    events.job_log(job, f"{status}: {message}" if message else status, level)
    events.publish_status(job)
    fleet.publish()
    return status


def _train(job: Job, lease: Lease) -> str | None:
    examples = _examples(job)
    config = job.train_config()
    try:
        tokenizer = base_models.tokenizer(job.base_model)
        data = prepare_training_data(tokenizer, examples, config)
    except ValueError as exc:
        raise JobFailed(str(exc)) from exc
    total = config.total_steps(len(data.train))
    config = dataclasses.replace(config, eval_every=max(1, total // 10) if data.val else 0)
    Job.objects.filter(pk=job.pk).update(total_steps=total, train_examples=len(data.train),
                                         val_examples=len(data.val))
    job.refresh_from_db()
    events.publish_status(job)
    events.job_log(job, f"{len(data.train)} training and {len(data.val)} validation examples"
                        + (f" ({data.dropped} without a trained token dropped)" if data.dropped else "")
                        + f"; {total} steps")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    losses = 0  # trunk losses in a row without a new checkpoint in between
    leaving = job.move_from_id  # the trunk staff asked this job to move off (its id), e.g. before a worker died
    if leaving is not None:
        lease.mine().update(move_from=None)
    avoid: set[int] = set()  # trunks that stopped answering: replaced when another trunk can take their place
    while True:
        resume = _resume_point(job)
        connections = _connect(job, config.wire_encoding, lease, leaving, avoid)
        leaving, avoid = None, set()
        try:
            engine = _open_engine(job, config, connections, lease)
        except MoveRequested as move:  # asked while it waited for a free session
            _close(connections)
            leaving = move.trunk_id
            _leave(job, lease, move.trunk_id)
            continue
        except BaseException:
            _close(connections)
            raise
        for connection, link in zip(connections, engine.links, strict=True):
            connection.layers = link.layers
        try:
            _record_links(job, lease, Placement(tuple(Link(connection.trunk, connection.layers)
                                                      for connection in connections)))
        except LeaseLost:
            engine.close()
            _close(connections)
            raise
        events.job_log(job, _describe_cut(engine, connections))
        if privacy.FIRST_STEP not in (job.privacy_audit or {}):
            set_phase(job, "measuring what the trunk could read (the leakage audit)")
            _audit(job, lease, engine, tokenizer, examples, privacy.FIRST_STEP)
        set_phase(job, Job.TRAINING_PHASE)
        trainer = SplitTrainer(engine, config, data, pad_id, checkpoint_dir=job.checkpoint_dir,
                               callbacks=[lambda event: _record(job, lease, event)],
                               should_cancel=lease.interrupted)
        try:
            result = trainer.run(resume_from=resume)
            if result.status == "cancelled":
                cancel, leaving = lease.requests()
                if cancel or leaving is None:
                    return _finish(job, lease, Job.Status.CANCELLED, f"cancelled at step {result.step} of {total}; "
                                                                     "resume to continue from there")
                _leave(job, lease, leaving)
                continue
            if config.privacy.nopeek > 0:
                set_phase(job, "measuring what the trunk could read after training")
                _audit(job, lease, engine, tokenizer, examples, privacy.LAST_STEP)
            set_phase(job, "writing the adapter")
            trainer.export_adapter(job.adapter_dir, job.base_model)
            break
        except TrunkError as error:
            lost = _failed(error, connections)
            progressed = _checkpoint_step(job) > (read_checkpoint_state(resume).step if resume else 0)
            losses = 1 if progressed else losses + 1
            if error.fault not in TRUNK_LOST or losses > settings.JOB_TRUNK_RECOVERIES:
                raise JobFailed(_trunk_failure(lost, error, job, connections)) from error
            if error.fault in (Fault.LOST, Fault.RETRYABLE):
                avoid = {lost.trunk.pk}  # it does not answer: another trunk may take its place
            events.job_log(job, f"{_trunk_lost(lost, error, job, connections)}; {_waiting_for(lost, connections)}, "
                                f"then continuing from {_kept(job)}", JobLog.Level.WARNING)
        except TrainingDiverged as exc:
            raise JobFailed(str(exc)) from exc
        except OSError as exc:
            where = exc.filename or job.directory
            raise JobFailed(f"could not write {where} ({exc.strerror or exc}); {_what_is_kept(job)} — free "
                            "space or fix permissions, then resume") from exc
        finally:
            engine.close()
            _close(connections)
    return _finish(job, lease, Job.Status.SUCCEEDED)


def _checkpoint_step(job: Job) -> int:
    kept = list_checkpoints(job.checkpoint_dir)
    return read_checkpoint_state(kept[-1]).step if kept else 0


def _kept(job: Job) -> str:
    step = _checkpoint_step(job)
    return f"the checkpoint of step {step}" if step else "the start (no checkpoint was written yet)"


def _what_is_kept(job: Job) -> str:
    return f"{_kept(job)} is kept" if _checkpoint_step(job) else "no checkpoint was written yet"


def _resume_point(job: Job) -> Path | None:
    """The newest checkpoint; metric rows after it are dropped (those steps run again)."""
    checkpoints = list_checkpoints(job.checkpoint_dir)
    if not checkpoints:
        MetricPoint.objects.filter(job=job).delete()
        return None
    step = read_checkpoint_state(checkpoints[-1]).step
    MetricPoint.objects.filter(job=job, step__gt=step).delete()
    events.job_log(job, f"resuming from the checkpoint of step {step}")
    return checkpoints[-1]


def _examples(job: Job):
    dataset = job.dataset
    if dataset is None:
        raise JobFailed("the dataset of this job was deleted; start a new job with another dataset")
    try:
        with dataset.file.open("rb") as handle:
            return parse_dataset(handle.read(), dataset.original_filename).examples
    except FileNotFoundError as exc:
        raise JobFailed(f"the file of dataset {dataset.name!r} is missing from the server") from exc
    except DatasetFormatError as exc:
        raise JobFailed(str(exc)) from exc


def _leave(job: Job, lease: Lease, trunk_id: int) -> None:
    """A move off the trunk ``trunk_id`` was asked for and the job stopped there (the trainer with a
    checkpoint, or the wait for a free session): clear the request and say so."""
    lease.mine().update(move_from=None)
    job.move_from = None
    trunk = TrunkServer.objects.filter(pk=trunk_id).first()
    name = trunk.name if trunk is not None else f"#{trunk_id}"
    links = job.chain()
    link = next((link for link in links if link.trunk_id == trunk_id), None)
    if link is not None and len(links) > 1:
        events.job_log(job, f"moving off the trunk server {name} (link {link.number} of the chain, {link.blocks}) as "
                            f"an administrator asked; continuing from {_kept(job)} with another trunk server in its "
                            "place")
        return
    events.job_log(job, f"moving off the trunk server {name} as an administrator asked; continuing from "
                        f"{_kept(job)} on another trunk server")


class MoveRequested(Exception):
    """Staff asked the job to move off a trunk (``trunk_id``) while it waited for a free session."""

    def __init__(self, trunk_id: int) -> None:
        super().__init__(f"move off trunk {trunk_id}")
        self.trunk_id = trunk_id


@dataclasses.dataclass
class Connection:
    """One link's trunk record and a client connected to it."""

    trunk: TrunkServer
    client: TrunkClient
    layers: range | None = None  # the blocks it runs, once its session is open


def _choose(job: Job, leaving: int | None, avoid: set[int]) -> Placement:
    """Where to connect: off ``leaving`` when another trunk can take its place, else the job's own trunk (when
    the user chose one), or its links (see placement.continue_on), or the best placement for a new job."""
    if leaving is not None:
        try:
            return placement.move_off(job, leaving, avoid)
        except NoTrunkAvailable as error:
            events.job_log(job, f"no other trunk server can take this job, so it stays ({error})",
                           JobLog.Level.WARNING)
    if job.trunk_id is not None and not job.trunk_auto:
        trunk = TrunkServer.objects.get(pk=job.trunk_id)
        if trunk.draining and not list_checkpoints(job.checkpoint_dir):
            raise NoTrunkAvailable(f"the trunk server {trunk.name} is draining for maintenance and takes no new "
                                   "jobs; an administrator ends the drain on the fleet page")
        return Placement.single(trunk, (job.bottom_layers, job.top_layers))
    return placement.continue_on(job, avoid)


def _connect(job: Job, wire_encoding: str, lease: Lease, leaving: int | None = None,
             avoid: set[int] | None = None) -> list[Connection]:
    """A client for every link of the job's placement (another trunk than ``leaving`` when one can take its
    place; ``avoid``: trunks that stopped answering), waiting up to TRUNK_WAIT_S for them to answer."""
    deadline = time.monotonic() + settings.TRUNK_WAIT_S
    delay = 1.0
    avoid = set(avoid or ())
    failed: TrunkServer | None = None
    while True:
        chosen = None
        try:
            chosen = _choose(job, leaving, avoid)
            leaving = None
            connections = _open_clients(job, chosen, wire_encoding)
            try:
                _record_links(job, lease, chosen)
            except LeaseLost:
                _close(connections)
                raise
            events.job_log(job, _connected(chosen))
            fleet.publish()
            return connections
        except (NoTrunkAvailable, TrunkError) as error:
            if isinstance(error, TrunkError):
                failed = _trunk_named(error.trunk, chosen) or job.trunk
                if error.fault == Fault.UNAUTHENTICATED:
                    raise JobFailed(f"the trunk server {failed or ''} refused the token; an administrator must "
                                    "update it") from error
                if failed is not None:
                    avoid.add(failed.pk)
            if lease.cancel_requested():
                raise JobCancelled from error
            if time.monotonic() >= deadline:
                raise JobFailed(_unreachable(job, error, failed)) from error
            events.job_log(job, f"waiting for a trunk server: {error}", JobLog.Level.WARNING)
            set_phase(job, "waiting for a trunk server to answer")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 15.0)


def _open_clients(job: Job, chosen: Placement, wire_encoding: str) -> list[Connection]:
    """A client per link, each checked with an Info call; a TrunkError (naming the trunk) when one does not answer."""
    connections: list[Connection] = []
    try:
        for index, link in enumerate(chosen.links, start=1):
            where = f"link {index} of the chain, " if chosen.is_chain else ""
            set_phase(job, f"connecting to {where}the trunk server {link.trunk.name}")
            client = link.trunk.client(wire_encoding, timeout_s=settings.TRUNK_RPC_TIMEOUT_S)
            connections.append(Connection(link.trunk, client))
            client.info()
    except BaseException:
        _close(connections)
        raise
    return connections


def _record_links(job: Job, lease: Lease, chosen: Placement) -> None:
    """Record where the job runs, only while the job is ours (a worker taken for dead writes nothing)."""
    if not lease.mine().exists():
        raise LeaseLost(f"job {job.pk} was taken over by another worker")
    placement.record(job, chosen)


def _close(connections: list[Connection]) -> None:
    for connection in connections:
        connection.client.close()


def _connected(chosen: Placement) -> str:
    if not chosen.is_chain:
        trunk = chosen.links[0].trunk
        return f"connected to the trunk server {trunk.name} (layers {trunk.layer_range})"
    return f"connected to a chain of {len(chosen.links)} trunk servers: {chosen.describe()}"


def _trunk_named(name: str | None, chosen: Placement | None) -> TrunkServer | None:
    if chosen is None:
        return None
    return next((trunk for trunk in chosen.trunks if trunk.name == name), chosen.trunks[0])


def _failed(error: TrunkError, connections: list[Connection]) -> Connection:
    """The link whose trunk raised ``error`` (the first when the error does not say)."""
    return next((connection for connection in connections if connection.trunk.name == error.trunk), connections[0])


def _unreachable(job: Job, error: Exception, trunk: TrunkServer | None) -> str:
    waited = f"after waiting {settings.TRUNK_WAIT_S:.0f} s"
    if isinstance(error, NoTrunkAvailable):
        return f"{error} ({waited})"
    trunk = trunk or job.trunk
    where = f"the trunk server {trunk.name} at {trunk.address}" if trunk else "the trunk server"
    return f"{error.explain(where)} {waited}; check that it is running, then resume the job"


def _audit(job: Job, lease: Lease, engine: SplitEngine, tokenizer, examples, moment: str) -> None:
    """Run and store the leakage audit; a failed audit is reported, the training goes on."""
    try:
        with engine.session_kept_alive():  # the audit can outlast the trunk's lease on an idle session
            report = privacy.audit_job(job, lease, engine, tokenizer, examples, moment)
    except LeaseLost:
        raise
    except Exception as exc:  # noqa: BLE001 - the audit must not take the job down with it
        log.exception("job %s: leakage audit failed", job.pk)
        events.job_log(job, f"the leakage audit failed ({type(exc).__name__}: {exc}); what the trunk could read "
                            "was not measured for this job", JobLog.Level.ERROR)
        return
    if report is None:
        return
    rates = ", ".join(f"{result.title} {result.rate:.0%}" for result in report.results)
    links = job.chain()
    chain = (f"; on hidden states it plays the first link of the chain, {links[0].trunk_name}, which receives the "
             f"Bottom's output" if len(links) > 1 else "")
    events.job_log(job, f"privacy audit ({privacy.MOMENTS[moment]}): {privacy.headline(report.worst_rate)} "
                        f"({rates}; {report.examples} examples, {report.seconds:.0f} s{chain})",
                   JobLog.Level.WARNING if report.worst_rate >= 0.05 else JobLog.Level.INFO)
    events.publish_status(job)


def _describe_cut(engine: SplitEngine, connections: list[Connection]) -> str:
    spec, noise = engine.spec, engine.noise
    blurred = [f"{what} noise {scale:g}" for what, scale in (("hidden-state", noise.hidden_scale),
                                                             ("gradient", noise.grad_scale)) if scale]
    trunk = f"the trunk runs layers {spec.trunk_layers.start}-{spec.trunk_layers.stop - 1}"
    if len(engine.links) > 1:
        links = ", ".join(f"link {index} {connection.trunk.name} {blocks_words(link.layers)}"
                          for index, (connection, link) in enumerate(zip(connections, engine.links, strict=True),
                                                                     start=1))
        trunk = (f"a chain of {len(engine.links)} trunk servers runs layers {spec.trunk_layers.start}-"
                 f"{spec.trunk_layers.stop - 1} ({links}; the first link receives the Bottom's output)")
    return (f"cut: {spec.n_bottom} blocks here, {trunk}, {spec.n_top} blocks here after it; "
            + (", ".join(blurred) if blurred else "no noise"))


def _open_engine(job: Job, config, connections: list[Connection], lease: Lease) -> SplitEngine:
    """Open the trunk sessions (one per link), with the job's own key (``Job.client_secret``: the same on every
    worker and after a move or a replaced link, so the job's checkpoints resume). A trunk at its session cap
    makes the job wait (until a session frees up or the user cancels), not fail; MoveRequested when staff ask
    the job to move off a trunk meanwhile. The caller closes the clients when this raises."""
    told = False
    names = " and ".join(connection.trunk.name for connection in connections)
    set_phase(job, f"loading the model and opening a session on {names}")
    while True:
        try:
            return SplitEngine(base_models.client_model(job.base_model), config,
                               [connection.client for connection in connections], label=f"job {job.pk}",
                               secret=job.client_secret(), device=base_models.worker_device())
        except TrunkError as error:
            full = _failed(error, connections)
            if error.fault != Fault.FULL:
                raise JobFailed(_trunk_failure(full, error, job, connections)) from error
            if not told:
                events.job_log(job, f"{full.trunk.name} is at its session capacity; waiting for a free session",
                               JobLog.Level.WARNING)
                set_phase(job, f"waiting for a free session on {full.trunk.name}")
                told = True
            cancel, leaving = lease.requests()
            if cancel:
                raise JobCancelled from error
            if leaving is not None:
                raise MoveRequested(leaving) from error
            time.sleep(CAPACITY_POLL_S)
        except ValueError as exc:  # a trunk serves another model, or the split does not fit
            raise JobFailed(str(exc)) from exc


def _where(lost: Connection, connections: list[Connection]) -> str:
    """The lost trunk in a user's words; in a chain, which link it is and its blocks."""
    where = f"the trunk server {lost.trunk.name} at {lost.trunk.address}"
    if len(connections) > 1:
        blocks = f", {blocks_words(lost.layers)}" if lost.layers else ""
        where += f" (link {connections.index(lost) + 1} of the chain{blocks})"
    return where


def _trunk_lost(lost: Connection, error: TrunkError, job: Job, connections: list[Connection]) -> str:
    """What happened to the trunk, in a user's words."""
    where = _where(lost, connections)
    if error.fault in (Fault.LOST, Fault.RETRYABLE):
        job.refresh_from_db(fields=["current_step"])
        return f"{where} stopped answering at step {job.current_step + 1}"
    return error.explain(where, session="this job's session")


def _waiting_for(lost: Connection, connections: list[Connection]) -> str:
    if len(connections) == 1:
        return "waiting for it to answer again"
    blocks = blocks_words(lost.layers) if lost.layers else "its blocks"
    return f"waiting for it to answer again or for another trunk server to serve {blocks}"


def _trunk_failure(lost: Connection, error: TrunkError, job: Job, connections: list[Connection]) -> str:
    return (f"{_trunk_lost(lost, error, job, connections)}; {_what_is_kept(job)} — resume the job when the trunk is "
            "available")


def _record(job: Job, lease: Lease, event: TrainerEvent) -> None:
    """Store the event as a row first (the history), then send it live. Only while the job is
    ours: a worker taken for dead stops here, before it writes a row or a checkpoint."""
    if isinstance(event, StepMetrics):
        if not lease.mine().update(current_step=event.step, last_loss=event.loss, updated_at=timezone.now()):
            raise LeaseLost(f"job {job.pk} was taken over by another worker")
        point, _ = MetricPoint.objects.update_or_create(
            job=job, step=event.step, kind=MetricPoint.Kind.TRAIN, defaults=dict(
                loss=event.loss, lr=event.lr, grad_norm=event.grad_norm, tokens_per_s=event.tokens_per_s,
                wire_bytes=event.wire_bytes, elapsed_s=event.elapsed_s))
        events.publish_step(job, point, event.total_steps)
    elif isinstance(event, EvalMetrics):
        if not lease.mine().update(last_val_loss=event.val_loss):
            raise LeaseLost(f"job {job.pk} was taken over by another worker")
        point, _ = MetricPoint.objects.update_or_create(job=job, step=event.step, kind=MetricPoint.Kind.EVAL,
                                                        defaults=dict(val_loss=event.val_loss))
        events.publish(job, events.point_event(point))
        events.job_log(job, f"step {event.step}: validation loss {event.val_loss:.4f}")
    elif isinstance(event, CheckpointSaved):
        log.info("job %s: checkpoint of step %s saved", job.pk, event.step)  # too frequent for the user's log
