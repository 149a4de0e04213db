"""Faults during a job: each one ends with the job ``succeeded`` and nothing lost.

Real processes throughout: the trunk server, the Celery workers, celery beat and Redis are
started here and killed with SIGKILL (or frozen with SIGSTOP) mid-job. The module has its
own Redis, so the session's worker never sees these jobs. Every faulty run is compared
with an uninterrupted run of the same job: same losses at every step, same adapter.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.utils import timezone
from polling import wait_until
from safetensors.torch import load_file
from web_fixtures import TINY_MODEL_ID, wait_for_job
from web_services import sender_for_broker, start_redis, start_worker

from splitcore import LoraSettings
from splitcore.remote.client import TrunkClient
from splitcore.remote.process import start_trunk
from splitcore.training import list_checkpoints
from splitcore.training.checkpoints import checkpoint_name, load_checkpoint, read_checkpoint_state
from webapp.datasets.services import create_dataset
from webapp.playground.models import Generation
from webapp.processes import start_beat
from webapp.training import services
from webapp.training.lease import Lease, LeaseLost, claim, release_stale
from webapp.training.models import Job, JobLog, MetricPoint
from webapp.trunks import actions, fleet
from webapp.trunks.health import check_trunk
from webapp.trunks.models import TrunkServer

pytestmark = pytest.mark.django_db(transaction=True)

STEPS = 16
ROWS = [{"prompt": f"Q: what is {i} times three?\nA:", "completion": f" {3 * i}"} for i in range(40)]
JOB = dict(base_model=TINY_MODEL_ID, trunk_auto=False, max_steps=STEPS, batch_size=2, grad_accum_steps=2,
           max_seq_length=32, learning_rate=0.02, lora_r=4, lora_alpha=8, lora_dropout=0.1, val_fraction=0.1,
           seed=3, train_trunk_lora=True)
HEARTBEAT_S, STALE_AFTER_S = 0.5, 3.0


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("fault-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_env(service_env, fault_redis) -> dict[str, str]:
    return {**service_env, "CELERY_BROKER_URL": fault_redis.url, "REDIS_URL": fault_redis.url,
            "JOB_HEARTBEAT_S": str(HEARTBEAT_S), "JOB_STALE_AFTER_S": str(STALE_AFTER_S), "JOB_SWEEP_S": "0.5",
            "TRUNK_WAIT_S": "120", "JOB_CHECKPOINT_EVERY": "2",
            "JOB_REDISPATCH_S": "2", "GENERATION_TIMEOUT_S": "1"}


@pytest.fixture(scope="module")
def broker(fault_redis):
    """Sends task messages to this module's Redis, on their queues (the test process's own app talks to the
    session's)."""
    app = sender_for_broker(fault_redis.url)
    yield lambda row, task="training.run_job": app.send_task(task, args=[row.pk])
    app.close()


class Workers:
    """Workers started by a test, all stopped (or killed) at its end."""

    def __init__(self, env, logs: Path) -> None:
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str):
        worker = start_worker(self.env, self.logs / f"{name}.log", name=name, new_session=True)
        self.started.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGCONT)
                worker.stop()


@pytest.fixture
def workers(fault_env, fault_redis, web_dirs):
    """Starts with an empty broker: no task message left by an earlier test (a beat's trunk check)."""
    redis.Redis.from_url(fault_redis.url).flushdb()
    started = Workers(fault_env, web_dirs["logs"])
    yield started
    started.close()


@pytest.fixture
def beat(fault_env, tmp_path, web_dirs):
    process = start_beat(fault_env, web_dirs["logs"] / f"beat-{tmp_path.name}.log", tmp_path / "beat-schedule")
    yield process
    process.stop()


@pytest.fixture
def trunk(web_dirs, tmp_path):
    """A trunk server of its own (tests kill it), registered for this test."""
    process = start_trunk(web_dirs["models"] / TINY_MODEL_ID, tmp_path)
    record = TrunkServer.objects.create(name="fault-trunk", address=process.address, token=process.token)
    yield process, record
    process.stop()


def new_job(owner, trunk_record, **changes) -> Job:
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    dataset = create_dataset(owner, SimpleUploadedFile("times.jsonl", data), name=f"times-{time.monotonic_ns()}")
    return Job.objects.create(owner=owner, dataset=dataset, dataset_name=dataset.name, trunk=trunk_record,
                              **{**JOB, **changes})


def train_losses(job: Job) -> list[float]:
    return list(MetricPoint.objects.filter(job=job, kind="train").order_by("step").values_list("loss", flat=True))


def adapter(job: Job) -> dict[str, torch.Tensor]:
    return load_file(job.adapter_dir / "adapter_model.safetensors")


def log_text(job: Job) -> str:
    return "\n".join(JobLog.objects.filter(job=job).values_list("message", flat=True))


def reached(step: int):
    return lambda job: job.current_step >= step or job.is_finished


def assert_same_run(job: Job, reference: dict) -> None:
    assert job.status == "succeeded", f"{job.error_message}\n{log_text(job)}"
    losses = train_losses(job)
    assert len(losses) == STEPS, "a metric row for every step, none twice"
    assert losses == pytest.approx(reference["losses"], abs=1e-4)
    assert job.last_loss == pytest.approx(reference["losses"][-1], abs=1e-4)
    tensors = adapter(job)
    assert tensors.keys() == reference["adapter"].keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, reference["adapter"][name], atol=1e-4, rtol=0, msg=name)


def holds_the_database_lock(wait_s: float = 0.5) -> bool:
    """Whether a process keeps SQLite's write lock past ``wait_s`` (a live writer lets go sooner, a frozen one never)."""
    probe = sqlite3.connect(connection.settings_dict["NAME"], timeout=wait_s, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


def freeze_mid_job(job: Job, pid: int, group: bool = False) -> Job:
    """SIGSTOP ``pid`` once the job is past its first checkpoint (step 2) and check it is mid-job.

    A process frozen inside a database write would lock every other worker out of SQLite until it
    wakes up: then it is let go on and frozen again a moment later, out of the write.
    """
    job = wait_for_job(job.pk, condition=reached(3), timeout=300)
    send = os.killpg if group else os.kill
    deadline = time.monotonic() + 60
    send(pid, signal.SIGSTOP)
    while holds_the_database_lock():
        assert time.monotonic() < deadline, "the frozen worker kept the database locked at every try"
        send(pid, signal.SIGCONT)
        time.sleep(0.05)  # a moment of running (the point: time passes) to finish the write it was frozen in
        send(pid, signal.SIGSTOP)
    job.refresh_from_db()
    assert job.status == "running" and 3 <= job.current_step < STEPS, \
        f"the fault must hit mid-job: {job.status} at step {job.current_step}"
    return job


@pytest.fixture(scope="module")
def reference(django_db_blocker, fault_env, web_dirs, broker, tmp_path_factory):
    """The uninterrupted run every faulty run must reproduce."""
    from django.contrib.auth import get_user_model

    with django_db_blocker.unblock():
        owner = get_user_model().objects.create_user("reference-owner", password="unused-pass-123")
        process = start_trunk(web_dirs["models"] / TINY_MODEL_ID, tmp_path_factory.mktemp("reference-trunk"))
        record = TrunkServer.objects.create(name="reference-trunk", address=process.address, token=process.token)
        worker = start_worker(fault_env, web_dirs["logs"] / "reference-worker.log", name="reference")
        try:
            job = new_job(owner, record)
            broker(job)
            job = wait_for_job(job.pk, timeout=300, worker=worker)
            assert job.status == "succeeded", job.error_message
            result = {"losses": train_losses(job), "adapter": adapter(job)}
        finally:
            worker.stop()
            process.stop()
        assert len(result["losses"]) == STEPS
        return result


def test_trunk_killed_mid_job_and_restarted(owner, trunk, workers, broker, reference, web_dirs, tmp_path):
    process, record = trunk
    worker = workers.start("trunk-fault")
    job = new_job(owner, record)
    broker(job)
    job = freeze_mid_job(job, process.pid)
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    # The job waits (its checkpoint of step 2 or later is on disk); the trunk comes back on the same
    # address with a fresh memory: no session, no adapter, no optimizer state.
    wait_for_job(job.pk, condition=lambda j: "stopped answering" in log_text(j) or j.is_finished, timeout=120)
    port = process.address.rsplit(":", 1)[1]
    restarted = start_trunk(web_dirs["models"] / TINY_MODEL_ID, tmp_path, "--port", port, token=process.token)
    try:
        job = wait_for_job(job.pk, timeout=300, worker=worker)
        assert_same_run(job, reference)
        text = log_text(job)
        assert f"the trunk server fault-trunk at {record.address} stopped answering at step" in text
        assert "waiting for it to answer again, then continuing from the checkpoint of step" in text
        assert "resuming from the checkpoint of step" in text
        assert job.attempts == 1, "the same worker carried on; the job was never queued again"
    finally:
        restarted.stop()



def test_worker_killed_mid_job_is_taken_over_by_another(owner, trunk, workers, beat, broker, reference):
    _, record = trunk
    first = workers.start("doomed")
    job = new_job(owner, record)
    broker(job)
    job = freeze_mid_job(job, first.process.pid, group=True)
    os.killpg(first.process.pid, signal.SIGKILL)  # the worker and its pool, as when a machine dies
    first.process.wait()
    assert Job.objects.get(pk=job.pk).status == "running", "nobody can know yet that the worker is gone"

    second = workers.start("rescuer")
    job = wait_for_job(job.pk, timeout=300, worker=second)
    assert_same_run(job, reference)
    assert job.attempts == 2
    text = log_text(job)
    assert f"stopped answering (no heartbeat for {STALE_AFTER_S:.0f} s); queued again" in text
    assert "resuming from the checkpoint of step" in text
    assert "started on worker" in text and "(attempt 2)" in text


def test_a_frozen_worker_that_comes_back_never_runs_the_job_alongside_its_successor(
        owner, trunk, workers, beat, broker, reference):
    _, record = trunk
    frozen = workers.start("frozen")
    job = new_job(owner, record)
    broker(job)
    job = freeze_mid_job(job, frozen.process.pid, group=True)
    workers.start("successor")
    job = wait_for_job(job.pk, condition=lambda j: j.attempts == 2 and j.current_step > 0 or j.is_finished,
                       timeout=120)
    os.killpg(frozen.process.pid, signal.SIGCONT)  # it wakes up mid-step with a lease that is no longer its own
    job = wait_for_job(job.pk, timeout=300)
    assert_same_run(job, reference)
    assert job.attempts == 2
    wait_until(lambda: "another worker took it over" in frozen.log(), "the frozen worker says it was taken over",
               timeout=30, observed=lambda: frozen.log()[-3000:], interval=0.2)
    assert "job %s crashed" % job.pk not in frozen.log()


def test_redis_restarted_mid_job(owner, trunk, workers, broker, fault_redis, reference):
    _, record = trunk
    worker = workers.start("redis-fault")
    job = new_job(owner, record)
    broker(job)
    job = wait_for_job(job.pk, condition=reached(3), timeout=300, worker=worker)
    fault_redis.process.send_signal(signal.SIGKILL)
    fault_redis.process.wait()
    time.sleep(1.0)  # an outage, not an instant restart: Redis stays away while the worker goes on (time passes)
    restarted = start_redis(fault_redis.directory, port=fault_redis.port)
    fault_redis.process = restarted.process
    job = wait_for_job(job.pk, timeout=300, worker=worker)
    assert_same_run(job, reference)
    assert job.attempts == 1

    # The worker reconnected to the restarted Redis: it takes new jobs and sends their live events.
    from asgiref.sync import async_to_sync
    from channels_redis.core import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[fault_redis.url])
    channel = async_to_sync(layer.new_channel)()
    later = new_job(owner, record, max_steps=2)
    async_to_sync(layer.group_add)(f"job-{later.pk}", channel)
    broker(later)
    received = async_to_sync(asyncio.wait_for)(layer.receive(channel), 60)
    assert received["type"] == "job.event" and received["event"]["type"] in ("log", "metric", "status", "done")
    assert wait_for_job(later.pk, timeout=120, worker=worker).status == "succeeded"


def test_a_queued_job_whose_message_was_lost_is_sent_again(owner, trunk, workers, beat):
    _, record = trunk
    job = new_job(owner, record, max_steps=2)  # queued, but its message never reached Redis (a restart lost it)
    worker = workers.start("redispatch")
    job = wait_for_job(job.pk, timeout=120, worker=worker)
    assert job.status == "succeeded" and job.attempts == 1
    assert "job recovery: {'requeued': 0, 'cancelled': 0, 'redispatched': 1}" in beat_and_worker_logs(worker, beat)


def beat_and_worker_logs(*processes) -> str:
    return "\n".join(process.log() for process in processes)


def test_a_failed_checkpoint_write_fails_the_job_and_keeps_the_previous_checkpoint(
        owner, trunk, workers, broker, reference):
    _, record = trunk
    worker = workers.start("disk-fault")
    job = new_job(owner, record)
    job.checkpoint_dir.mkdir(parents=True)
    obstacle = job.checkpoint_dir / checkpoint_name(4)
    obstacle.write_text("not a checkpoint directory")  # writing the checkpoint of step 4 fails
    broker(job)
    job = wait_for_job(job.pk, timeout=300, worker=worker)
    assert job.status == "failed"
    assert job.error_message.startswith(f"could not write {obstacle} (Not a directory); the checkpoint of step 2 "
                                        "is kept — free space or fix permissions, then resume"), job.error_message
    kept = list_checkpoints(job.checkpoint_dir)
    assert [path.name for path in kept] == [checkpoint_name(2)]
    assert read_checkpoint_state(kept[0]).step == 2
    assert load_checkpoint(kept[0]).trunk_state, "the trunk's share is in the checkpoint too"
    assert not [p for p in job.checkpoint_dir.iterdir() if p.name.startswith(".staging")], "no half-written files"

    # Fixed, and resumed: it continues from step 2 and ends as the uninterrupted run did.
    obstacle.unlink()
    Job.objects.filter(pk=job.pk).update(status="queued", error_message="")
    broker(job)
    job = wait_for_job(job.pk, condition=lambda j: j.status != "failed" and j.is_finished, timeout=300,
                       worker=worker)
    assert_same_run(job, reference)
    assert "resuming from the checkpoint of step 2" in log_text(job)


def test_a_lease_taken_over_refuses_every_write_of_the_old_worker(owner):
    record = TrunkServer.objects.create(name="never-called", address="127.0.0.1:9", token="unused-token")
    job = new_job(owner, record)
    token = claim(job.pk)
    assert token and claim(job.pk) is None, "a running job cannot be claimed again"
    lease = Lease(job.pk, token)
    assert lease.renew() and not lease.cancel_requested()
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))  # its worker went silent
    job.refresh_from_db()
    assert release_stale(job) and Job.objects.get(pk=job.pk).status == "queued"
    successor = claim(job.pk)
    assert successor and successor != token
    assert not lease.renew() and lease.lost
    with pytest.raises(LeaseLost, match="taken over by another worker"):
        lease.cancel_requested()
    job.refresh_from_db()
    assert not release_stale(job), "a live lease is not released"


def wait_for_generation(generation: Generation, condition, timeout: float = 60) -> Generation:
    def reached() -> bool:
        generation.refresh_from_db()
        return condition(generation)

    wait_until(reached, f"generation {generation.pk} meets the test's condition", timeout=timeout,
               observed=lambda: generation.status)
    return generation


def new_generation(owner, trunk_record) -> Generation:
    check_trunk(trunk_record)  # up, so the playground picks it
    assert trunk_record.status == TrunkServer.Status.UP, trunk_record.last_error
    return Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt="Once upon a time", chat=False,
                                     max_new_tokens=32)


def test_a_generation_whose_worker_died_ends_as_failed(owner, trunk, workers, beat, broker):
    process, record = trunk
    worker = workers.start("generation-fault")
    generation = new_generation(owner, record)
    process.process.send_signal(signal.SIGSTOP)  # the first trunk call hangs: the worker is surely mid-answer
    try:
        broker(generation, "playground.generate")
        wait_for_generation(generation, lambda g: g.status == "running")
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    finally:
        process.process.send_signal(signal.SIGCONT)
    workers.start("generation-sweeper")  # any worker runs the sweep beat sends
    generation = wait_for_generation(generation, lambda g: g.is_finished)
    assert generation.status == "failed"
    assert generation.error_message == ("its worker stopped before it finished (no answer within the time limit "
                                        "of 1 s); the text so far is kept — try again")


def test_a_generation_past_its_time_limit_stops_and_keeps_its_text(owner, trunk, workers, broker):
    process, record = trunk
    workers.start("generation-limit")
    generation = new_generation(owner, record)
    process.process.send_signal(signal.SIGSTOP)  # the first token takes longer than the 1 s limit
    try:
        broker(generation, "playground.generate")
        wait_for_generation(generation, lambda g: g.status == "running")
        # Time passing is the point: the frozen trunk holds the first token past the 1 s limit, which the
        # worker can only notice once a token arrives.
        time.sleep(1.5)
    finally:
        process.process.send_signal(signal.SIGCONT)
    generation = wait_for_generation(generation, lambda g: g.is_finished)
    assert generation.status == "failed"
    assert generation.error_message == ("stopped after 1 s, the time limit of a generation; the text so far is "
                                        "kept — ask for fewer new tokens")
    assert 1 <= generation.token_count < 32 and generation.output


# ------------------------------------------------------------------ the fleet page's drain and move


@pytest.fixture
def second_trunk(web_dirs, tmp_path):
    """Another trunk of the same model, registered and checked up."""
    (tmp_path / "second").mkdir()
    process = start_trunk(web_dirs["models"] / TINY_MODEL_ID, tmp_path / "second")
    record = TrunkServer.objects.create(name="second-trunk", address=process.address, token=process.token)
    assert check_trunk(record).status == TrunkServer.Status.UP, record.last_error
    yield process, record
    process.stop()


def step_of(job: Job, pattern: str) -> int:
    """The step a log line names, e.g. "the checkpoint of step 6"."""
    return int(re.search(pattern, log_text(job)).group(1))


def test_a_job_moved_off_its_trunk_finishes_elsewhere_as_an_uninterrupted_run(owner, trunk, second_trunk, workers,
                                                                             broker, reference):
    process, record = trunk
    _, target = second_trunk
    check_trunk(record)
    worker = workers.start("mover")
    job = new_job(owner, record)  # on fault-trunk, chosen by the user
    broker(job)
    # Mid-job: the trunk is held (SIGSTOP) while staff press "Move jobs", so the step in flight is the last one
    # there; it finishes once the trunk goes on, and the job saves a checkpoint and moves.
    job = freeze_mid_job(job, process.pid)
    outcome = actions.move_jobs(record)
    process.process.send_signal(signal.SIGCONT)
    assert outcome.ok and f"job {job.pk} ({job.display_name}) to second-trunk" in outcome.message, outcome.message
    job = wait_for_job(job.pk, timeout=300, worker=worker)

    assert_same_run(job, reference)
    assert job.trunk == target and job.move_from is None
    text = log_text(job)
    assert "moving off the trunk server fault-trunk as an administrator asked" in text
    moved_at = step_of(job, r"continuing from the checkpoint of step (\d+) on another trunk server")
    assert 3 <= moved_at < STEPS, f"moved mid-job: {moved_at}"
    assert "connected to the trunk server second-trunk" in text.split("moving off")[1]
    # The trunk it left closed the job's session (the move ends it; nothing is left behind there).
    assert check_trunk(record).active_sessions == 0


def test_a_draining_trunk_finishes_its_job_takes_no_new_one_and_says_when_it_is_empty(
        owner, trunk, second_trunk, workers, broker, reference):
    process, record = trunk
    _, other = second_trunk
    check_trunk(record)
    first = workers.start("drain-first")
    running = new_job(owner, record)
    broker(running)
    running = freeze_mid_job(running, process.pid)
    assert actions.drain(record).ok
    assert not fleet.is_empty(TrunkServer.objects.get(pk=record.pk), [running])

    # New work goes elsewhere: a job with the automatic choice runs on the other trunk; one that names the
    # draining trunk waits (and is cancelled here).
    workers.start("drain-second")
    automatic = new_job(owner, None, trunk_auto=True, max_steps=4)
    broker(automatic)
    automatic = wait_for_job(automatic.pk, timeout=300)
    assert automatic.status == "succeeded" and automatic.trunk == other, automatic.error_message
    pinned = new_job(owner, record, max_steps=4)
    broker(pinned)
    pinned = wait_for_job(pinned.pk, condition=lambda j: "draining for maintenance" in log_text(j), timeout=120)
    services.cancel_job(pinned)
    assert wait_for_job(pinned.pk, timeout=60).status == "cancelled"

    # The running job goes on to its end, as if nothing happened; then the trunk is empty.
    process.process.send_signal(signal.SIGCONT)
    running = wait_for_job(running.pk, timeout=300, worker=first)
    assert_same_run(running, reference)
    assert running.trunk_id == record.pk
    drained = check_trunk(TrunkServer.objects.get(pk=record.pk))
    row = next(row for row in fleet.snapshot()["rows"] if row["id"] == record.pk)
    assert drained.draining and drained.active_sessions == 0
    assert (row["status"], row["empty"], row["jobs"]) == ("draining", True, [])


def test_a_job_waiting_for_a_session_on_a_full_trunk_moves_when_asked(owner, web_dirs, tmp_path, second_trunk,
                                                                     workers, broker):
    (tmp_path / "full").mkdir()
    full = start_trunk(web_dirs["models"] / TINY_MODEL_ID, tmp_path / "full", "--max-sessions", "1")
    record = TrunkServer.objects.create(name="full-trunk", address=full.address, token=full.token)
    check_trunk(record)
    holder = TrunkClient(full.address, full.token)
    try:
        holder.open_session(LoraSettings(r=4, alpha=8), seed=0)  # the trunk's one session
        worker = workers.start("waiter")
        job = new_job(owner, record, max_steps=4)
        broker(job)
        wait_for_job(job.pk, condition=lambda j: "at its session capacity" in log_text(j), timeout=120)
        outcome = actions.move_jobs(record)
        assert outcome.ok and "to second-trunk" in outcome.message, outcome.message
        job = wait_for_job(job.pk, timeout=300, worker=worker)
        assert job.status == "succeeded", f"{job.error_message}\n{log_text(job)}"
        assert job.trunk == second_trunk[1] and len(train_losses(job)) == 4
        assert "moving off the trunk server full-trunk as an administrator asked" in log_text(job)
    finally:
        holder.close()
        full.stop()


def test_a_job_on_a_draining_trunk_goes_on_there_after_its_worker_dies(owner, trunk, second_trunk, workers, beat,
                                                                      broker, reference):
    """Draining takes no new work; the work a trunk has goes on there. A job placed automatically on the
    trunk, drained mid-job, whose worker then dies, resumes on its own trunk, though another one is free."""
    _, record = trunk
    _, other = second_trunk
    TrunkServer.objects.filter(pk=other.pk).update(enabled=False)  # the job is placed on fault-trunk
    check_trunk(record)
    first = workers.start("drained-doomed")
    job = new_job(owner, None, trunk_auto=True)
    broker(job)
    job = freeze_mid_job(job, first.process.pid, group=True)
    assert job.trunk_id == record.pk
    assert actions.drain(record).ok
    TrunkServer.objects.filter(pk=other.pk).update(enabled=True)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()

    second = workers.start("drained-rescuer")
    job = wait_for_job(job.pk, timeout=300, worker=second)
    assert_same_run(job, reference)
    assert job.attempts == 2 and job.trunk_id == record.pk
    assert [link.trunk_id for link in job.chain()] == [record.pk]
    text = log_text(job).split("(attempt 2)")[1]
    assert "connected to the trunk server fault-trunk" in text and "second-trunk" not in text


def test_a_job_whose_move_target_vanished_goes_on_on_its_own_trunk(owner, trunk, second_trunk, workers, broker,
                                                                   reference):
    """Staff drain a trunk and move its job; the trunk chosen for it stops before the job gets there. The job
    goes on on its own (draining) trunk instead of failing."""
    process, record = trunk
    target_process, target = second_trunk
    check_trunk(record)
    worker = workers.start("stranded")
    job = new_job(owner, record)
    broker(job)
    job = freeze_mid_job(job, process.pid)
    assert actions.drain(record).ok
    outcome = actions.move_jobs(record)
    assert outcome.ok and "to second-trunk" in outcome.message, outcome.message
    target_process.stop()  # its record still says up: the health check has not seen it go
    process.process.send_signal(signal.SIGCONT)
    job = wait_for_job(job.pk, timeout=300, worker=worker)
    assert_same_run(job, reference)
    assert job.trunk_id == record.pk and job.move_from is None
    text = log_text(job).split("moving off the trunk server fault-trunk")[1]
    assert "connected to the trunk server fault-trunk" in text, text
