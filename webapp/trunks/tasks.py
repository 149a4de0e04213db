"""Celery tasks: periodic and on-demand trunk health checks (ids in, JSON out)."""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import DatabaseError

from . import fleet
from .health import check_trunk, check_trunks
from .models import TrunkServer

log = logging.getLogger(__name__)


@shared_task(name="trunks.check_all")
def check_all() -> dict[str, int]:
    """Check every enabled trunk (beat runs this every ``TRUNK_HEALTH_INTERVAL_S``); returns counts by status."""
    counts = {"up": 0, "down": 0}
    for trunk in check_trunks(TrunkServer.objects.filter(enabled=True)):
        counts[trunk.status] += 1
    fleet.publish()
    return counts


@shared_task(name="trunks.check_one")
def check_one(trunk_id: int) -> str | None:
    """Check one trunk now; returns its new status, or None when the trunk no longer exists."""
    trunk = TrunkServer.objects.filter(pk=trunk_id).first()
    if trunk is None:
        return None
    try:
        status = check_trunk(trunk).status
    except DatabaseError:
        log.warning("could not record the check of trunk %s (deleted meanwhile?)", trunk_id, exc_info=True)
        return None
    fleet.publish()
    return status
