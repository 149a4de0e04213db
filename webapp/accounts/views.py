"""Self sign-up, only when SIGNUP_ENABLED is on; log in / log out are Django's own views, log-in
throttled (throttle.py) with its form and refused with 429 Too Many Requests during a lockout."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import UserCreationForm
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from .forms import ThrottledAuthenticationForm


def refuse_when_locked_out(login_view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A log-in view whose page says 429 Too Many Requests (and Retry-After) when its form was locked out.

    The page is Django's own: the form carries the lockout's message as its error. It is read from the
    response's template context, so this also fits the admin's log-in, whose view builds its form itself.
    """

    @wraps(login_view)
    def view(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        response = login_view(request, *args, **kwargs)
        form = (getattr(response, "context_data", None) or {}).get("form")
        lockout = getattr(form, "lockout", None)
        if lockout is not None:
            response.status_code = 429
            response["Retry-After"] = str(lockout.retry_after_s)
        return response

    return view


login_page = refuse_when_locked_out(auth_views.LoginView.as_view(
    authentication_form=ThrottledAuthenticationForm, redirect_authenticated_user=True))


def signup(request: HttpRequest) -> HttpResponse:
    if not settings.SIGNUP_ENABLED:
        raise Http404("sign-up is disabled on this server; ask an administrator for an account")
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect(settings.LOGIN_REDIRECT_URL)
    return render(request, "accounts/signup.html", {"form": form})
