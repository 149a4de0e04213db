"""The fleet page for staff: every trunk server at a glance, live, with its actions. Thin: the rows
are built in fleet.py and the actions live in actions.py.

Only staff see it; to anyone else it does not exist (404). The actions also need the permission to
change trunk servers.
"""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from . import actions, fleet
from .models import TrunkServer

CHANGE_PERMISSION = "trunks.change_trunkserver"


def staff_only(view):
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not (request.user.is_authenticated and request.user.is_active and request.user.is_staff):
            raise Http404("no such page")
        return view(request, *args, **kwargs)

    return wrapper


@staff_only
def fleet_page(request: HttpRequest) -> HttpResponse:
    data = fleet.snapshot()
    return render(request, "trunks/fleet.html", {
        "fleet": data, "rows": data["rows"], "empty_row": fleet.empty_row(),
        "can_change": request.user.has_perm(CHANGE_PERMISSION), "action_labels": list(actions.LABELS.items()),
        "window_minutes": fleet.CHART_WINDOW_S // 60, "window_seconds": fleet.CHART_WINDOW_S,
        "check_interval": f"{settings.TRUNK_HEALTH_INTERVAL_S:g}"})


@staff_only
@require_POST
def fleet_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    perform = actions.ACTIONS.get(action)
    if perform is None:
        raise Http404(f"no action {action!r}")
    if not request.user.has_perm(CHANGE_PERMISSION):
        raise PermissionDenied("changing trunk servers needs the permission to change them")
    outcome = perform(get_object_or_404(TrunkServer, pk=pk))
    (messages.success if outcome.ok else messages.warning)(request, outcome.message)
    fleet.publish()
    return redirect("trunks:fleet")
