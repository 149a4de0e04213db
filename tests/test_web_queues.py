"""Training jobs, playground generations and control tasks run on separate queues.

With every training slot busy (a long job running, another one waiting behind it), a trunk
health check and a playground generation still complete at once. Real processes: Redis,
one Celery worker per queue, the session's trunk server. The module has its own Redis, so
the session's worker (which consumes every queue) never sees these messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from polling import wait_until
from web_fixtures import TINY_MODEL_ID, wait_for_job
from web_services import sender_for_broker, start_redis, start_worker

from webapp.celery import app as celery_app
from webapp.datasets.services import create_dataset
from webapp.playground.models import Generation
from webapp.training.models import Job
from webapp.training.services import cancel_job
from webapp.trunks.models import TrunkServer

ROWS = [{"prompt": f"Q: what is {i} plus one?\nA:", "completion": f" {i + 1}"} for i in range(40)]
# Far more steps than the test takes: the job is still running when the test cancels it.
LONG_JOB = dict(base_model=TINY_MODEL_ID, trunk_auto=False, max_steps=20_000, batch_size=2, max_seq_length=32,
                lora_r=4, lora_alpha=8, val_fraction=0.0, seed=5)
EXPECTED_ROUTES = {
    "training.run_job": "training",
    "playground.generate": "generation",
    "training.build_merged_model": "merge",
    "trunks.check_all": "control",
    "trunks.check_one": "control",
    "training.recover_jobs": "control",
    "playground.recover_generations": "control",
}


def queue_of(app, task: str) -> str:
    return app.amqp.router.route({}, task)["queue"].name


# ---------------------------------------------------------------- routes (no processes)


def test_each_task_is_routed_to_its_queue():
    sender = sender_for_broker("redis://127.0.0.1:1/0")  # never connects: routing happens before sending
    try:
        for task, queue in EXPECTED_ROUTES.items():
            assert queue_of(celery_app, task) == queue == queue_of(sender, task), task
    finally:
        sender.close()
    assert (settings.TRAINING_QUEUE, settings.GENERATION_QUEUE, settings.MERGE_QUEUE, settings.CONTROL_QUEUE) == (
        "training", "generation", "merge", "control")
    assert set(EXPECTED_ROUTES.values()) == set(settings.ALL_QUEUES)


def test_every_other_task_and_every_beat_task_goes_to_the_control_queue():
    """A new task lands on the control queue unless routed elsewhere on purpose."""
    celery_app.loader.import_default_modules()  # the tasks modules, found as a worker finds them
    ours = {name for name in celery_app.tasks if not name.startswith("celery.")}
    assert set(EXPECTED_ROUTES) <= ours
    for task in ours - {task for task, queue in EXPECTED_ROUTES.items() if queue != settings.CONTROL_QUEUE}:
        assert queue_of(celery_app, task) == settings.CONTROL_QUEUE, task
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        assert queue_of(celery_app, entry["task"]) == settings.CONTROL_QUEUE, entry["task"]


# ---------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def queue_redis(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("queue-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def queue_env(service_env, queue_redis) -> dict[str, str]:
    # No audit and rare checkpoints: the long job is busy training from its first seconds.
    return {**service_env, "CELERY_BROKER_URL": queue_redis.url, "REDIS_URL": queue_redis.url,
            "PRIVACY_AUDIT_SAMPLE": "0", "JOB_CHECKPOINT_EVERY": "1000"}


@pytest.fixture
def queue_workers(queue_env, queue_redis, web_dirs):
    """One worker per queue, one slot each, as make run starts them (names are the queues)."""
    redis.Redis.from_url(queue_redis.url).flushdb()
    workers = {}
    try:
        for queue in settings.ALL_QUEUES:
            workers[queue] = start_worker(queue_env, web_dirs["logs"] / f"queues-{queue}-worker.log",
                                          name=f"queues-{queue}", queues=[queue])
        yield workers
    finally:
        for worker in workers.values():
            worker.stop()


@pytest.fixture
def sender(queue_redis):
    app = sender_for_broker(queue_redis.url)
    yield app
    app.close()


def new_long_job(owner, trunk: TrunkServer) -> Job:
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    dataset = create_dataset(owner, SimpleUploadedFile("plus.jsonl", data), name=f"plus-{time.monotonic_ns()}")
    return Job.objects.create(owner=owner, dataset=dataset, dataset_name=dataset.name, trunk=trunk, **LONG_JOB)


def log_tail(worker) -> Callable[[], str]:
    """What a failed wait shows: the end of ``worker``'s log."""
    return lambda: worker.log()[-3000:]


@pytest.mark.django_db(transaction=True)
def test_health_checks_and_generations_do_not_wait_behind_training(owner, registered_trunk, queue_workers, sender,
                                                                   queue_redis):
    training = queue_workers[settings.TRAINING_QUEUE]
    broker = redis.Redis.from_url(queue_redis.url)
    running, waiting = new_long_job(owner, registered_trunk), new_long_job(owner, registered_trunk)
    try:
        sender.send_task("training.run_job", args=[running.pk])
        wait_for_job(running.pk, condition=lambda job: job.current_step >= 1 or job.is_finished, worker=training)
        sender.send_task("training.run_job", args=[waiting.pk])
        # The only training slot is busy: the second job's message waits on the training queue.
        wait_until(lambda: broker.llen(settings.TRAINING_QUEUE) == 1, "the second job's message is queued",
                   timeout=120, observed=log_tail(training), interval=0.1)

        checked_before = TrunkServer.objects.get(pk=registered_trunk.pk).last_checked_at
        generation = Generation.objects.create(owner=owner, base_model=TINY_MODEL_ID, prompt="Once upon a time",
                                               chat=False, max_new_tokens=8)
        sender.send_task("trunks.check_one", args=[registered_trunk.pk])
        sender.send_task("playground.generate", args=[generation.pk])

        wait_until(lambda: TrunkServer.objects.get(pk=registered_trunk.pk).last_checked_at != checked_before,
                   "the health check ran", timeout=120, observed=log_tail(queue_workers[settings.CONTROL_QUEUE]),
                   interval=0.1)
        wait_until(lambda: Generation.objects.get(pk=generation.pk).is_finished, "the generation finished",
                   timeout=120, observed=log_tail(queue_workers[settings.GENERATION_QUEUE]), interval=0.1)
        generation.refresh_from_db()
        assert generation.status == "succeeded", generation.error_message
        assert generation.token_count >= 1

        running.refresh_from_db()
        waiting.refresh_from_db()
        assert (running.status, waiting.status) == ("running", "queued"), "training was still busy meanwhile"
        assert running.current_step < running.max_steps
        assert broker.llen(settings.TRAINING_QUEUE) == 1
        received = {queue: worker.log() for queue, worker in queue_workers.items()}  # "Task <name>[<id>] received"
        assert "trunks.check_one[" in received[settings.CONTROL_QUEUE]
        assert "playground.generate[" in received[settings.GENERATION_QUEUE]
        assert "trunks.check_one[" not in received[settings.TRAINING_QUEUE]
        assert "playground.generate[" not in received[settings.TRAINING_QUEUE]
    finally:
        for job in (waiting, running):  # the queued one first, or the freed slot would start it
            job.refresh_from_db()
            if not job.is_finished:
                cancel_job(job)
        wait_for_job(running.pk, timeout=120, worker=training)
