"""The Celery application: workers run training jobs, playground generations and control tasks
(trunk health checks, sweeps), each kind on its own queue (settings.TRAINING_QUEUE and others)."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import task_postrun, worker_process_init

from splitcore.process_memory import limit_malloc_arenas, release_free_memory

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

app = Celery("webapp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _few_malloc_arenas(**_) -> None:
    limit_malloc_arenas()  # a pool process computes on several threads (torch, gRPC): see process_memory


@task_postrun.connect
def _give_back_freed_memory(**_) -> None:
    release_free_memory()  # a finished job's activations and adapters; the shared frozen weights stay


def sender_for_broker(broker_url: str) -> Celery:
    """An app that sends task messages to another broker, on the queues ``app`` routes them to.

    Tests that run workers on a Redis of their own send with it. The tasks stay registered with
    ``app``, which remains the current app; close the sender when done.
    """
    sender = Celery("webapp-sender", set_as_current=False)
    sender.config_from_object("django.conf:settings", namespace="CELERY")
    sender.conf.broker_url = broker_url
    return sender
