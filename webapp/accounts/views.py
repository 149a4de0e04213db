"""Self sign-up, only when SIGNUP_ENABLED is on; invitations from staff (invites.py); log in / log out are
Django's own views, log-in throttled (throttle.py) with its form and refused with 429 Too Many Requests during a
lockout."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib import messages
from django.contrib.auth.forms import SetPasswordForm, UserCreationForm
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.views.decorators.cache import never_cache

from .forms import InviteForm, ThrottledAuthenticationForm
from .invites import invite_link, invite_tokens, max_age_words

ADD_USER_PERMISSION = "auth.add_user"


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


@never_cache  # the page with the link must not be kept by a browser or proxy
def invite(request: HttpRequest) -> HttpResponse:
    """Staff create an invited user's account and get the one-time link, shown on this answer only. To anyone
    but staff the page does not exist (404); staff without the permission to add users are refused (403)."""
    user = request.user
    if not (user.is_authenticated and user.is_active and user.is_staff):
        raise Http404("no such page")
    if not user.has_perm(ADD_USER_PERMISSION):
        raise PermissionDenied("Inviting a user needs the permission to add users (authentication and "
                               "authorization | user | Can add user); ask an administrator.")
    form = InviteForm(request.POST or None)
    context = {"form": form, "max_age": max_age_words()}
    if request.method == "POST" and form.is_valid():
        invited = form.save()
        context.update(form=InviteForm(), invited=invited, link=invite_link(request, invited))
    return render(request, "accounts/invite.html", context)


class InviteAcceptView(auth_views.PasswordResetConfirmView):
    """The invited user's link: Django's set-password page (the token leaves the address at once) with the
    invitation's tokens; once the password is set they are logged in and the link is spent."""

    token_generator = invite_tokens
    form_class = SetPasswordForm
    post_reset_login = True
    template_name = "accounts/invite_accept.html"
    success_url = reverse_lazy(settings.LOGIN_REDIRECT_URL)
    extra_context = {"max_age": max_age_words()}

    def dispatch(self, *args, **kwargs):
        response = super().dispatch(*args, **kwargs)
        if not self.validlink and response.status_code == 200:
            response.status_code = 410  # Gone: used, expired or mangled; the page says which to ask for
        return response

    def form_valid(self, form):
        response = super().form_valid(form)
        messages.success(self.request, f"Welcome, {form.user.get_username()}: your password is set and you are "
                                       "logged in.")
        return response


invite_accept = InviteAcceptView.as_view()
