"""Faults during a job: each one ends with the job ``succeeded`` and nothing lost.

Real processes throughout: the trunk server, the Celery workers, celery beat and Redis are
started here and killed with SIGKILL (or frozen with SIGSTOP) mid-job. The module has its
own Redis, so the session's worker never sees these jobs. Every faulty run is compared
with an uninterrupted run of the same job: same losses at every step, same adapter.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from celery import Celery
from django.core.files.uploadedfile import SimpleUploadedFile
from safetensors.torch import load_file
from web_fixtures import TINY_MODEL_ID, wait_for_job
from web_services import start_redis, start_worker

from splitcore.training import list_checkpoints
from splitcore.training.checkpoints import checkpoint_name, load_checkpoint, read_checkpoint_state
from splitcore.trunk_process import start_trunk
from webapp.datasets.services import create_dataset
from webapp.processes import start_beat
from webapp.training.lease import Lease, claim, release_stale
from webapp.training.models import Job, JobLog, MetricPoint
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
            "TRUNK_WAIT_S": "120", "JOB_CHECKPOINT_EVERY": "2"}


@pytest.fixture(scope="module")
def broker(fault_redis):
    """Sends task messages to this module's Redis (the test process's own app talks to the session's)."""
    app = Celery("faults", broker=fault_redis.url)
    app.conf.task_serializer = "json"
    yield lambda job: app.send_task("training.run_job", args=[job.pk])
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
def workers(fault_env, web_dirs, request):
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


def freeze_mid_job(job: Job, pid: int, group: bool = False) -> Job:
    """SIGSTOP ``pid`` once the job is past its first checkpoint (step 2) and check it is mid-job."""
    job = wait_for_job(job.pk, condition=reached(3), timeout=300)
    (os.killpg if group else os.kill)(pid, signal.SIGSTOP)
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

