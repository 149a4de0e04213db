"""The site's error answers: pages in the site's layout (templates/400.html ... 500.html) for browsers, JSON
with a ``detail`` for API clients (a path under /api/, or an Accept header that asks for JSON and not HTML).

Django's own handlers render the pages (500.html with no request and no context); these only pick the form.
webapp/body_limit.py answers 413 before Django and picks the same way (``wants_json``).
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

API_PREFIX = "/api/"


def wants_json(path: str, accept: str) -> bool:
    """Whether the client reads JSON: an API path, or an Accept header naming JSON but not HTML."""
    accept = accept.lower()
    return path.startswith(API_PREFIX) or ("application/json" in accept and "text/html" not in accept)


def json_client(request: HttpRequest) -> bool:
    """Whether this request's client reads JSON (``wants_json``)."""
    return wants_json(request.path, request.headers.get("Accept", ""))


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if json_client(request):
        return JsonResponse({"detail": "bad request: the request could not be read"}, status=400)
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if json_client(request):
        return JsonResponse({"detail": str(exception) or "you may not do this"}, status=403)
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if json_client(request):
        return JsonResponse({"detail": f"not found: {request.path}"}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if json_client(request):
        return JsonResponse({"detail": "server error: the failure was logged; try again later"}, status=500)
    return defaults.server_error(request)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """A form or call without a valid CSRF token: the site's page (templates/403_csrf.html), or JSON that
    names Django's reason (a missing cookie, a token that does not match)."""
    if json_client(request):
        return JsonResponse({"detail": f"CSRF check failed ({reason or 'no reason given'}): reload the page, "
                                       "which sets a fresh token, and send again"}, status=403)
    return defaults.permission_denied(request, PermissionDenied(reason), template_name="403_csrf.html")
