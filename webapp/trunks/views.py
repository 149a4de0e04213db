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
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from ..error_pages import json_client
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
    """Perform ``action`` on trunk ``pk``. The page's script asks for JSON (``Accept: application/json``) and
    gets the outcome and the trunk's new row; a plain form post gets the outcome as a message on the page."""
    wants_json = json_client(request)
    perform = actions.ACTIONS.get(action)
    if perform is None:
        return _refuse(wants_json, Http404, f"There is no trunk action {action!r}.", 404)
    if not request.user.has_perm(CHANGE_PERMISSION):
        return _refuse(wants_json, PermissionDenied, "Changing trunk servers needs the permission to change them "
                                                     "(trunks | trunk server | Can change); ask an administrator.", 403)
    trunk = TrunkServer.objects.filter(pk=pk).first()
    if trunk is None:
        return _refuse(wants_json, Http404, f"Trunk server {pk} is gone: it was removed meanwhile.", 404)
    outcome = perform(trunk)
    fleet.publish()
    if wants_json:
        return JsonResponse({"ok": outcome.ok, "message": outcome.message, "row": fleet.row(pk)})
    (messages.success if outcome.ok else messages.warning)(request, outcome.message)
    return redirect("trunks:fleet")


def _refuse(wants_json: bool, error: type[Exception], message: str, status: int) -> HttpResponse:
    """The refusal as JSON for the page's script, else as Django's own error page."""
    if wants_json:
        return JsonResponse({"ok": False, "message": message}, status=status)
    raise error(message)
