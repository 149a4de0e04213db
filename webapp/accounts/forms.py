"""Django's log-in forms (the site's and the admin's) with failed log-ins throttled (see throttle.py)."""

from __future__ import annotations

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.views.decorators.debug import sensitive_variables

from . import throttle


class ThrottledLoginMixin:
    """Refuses a locked-out log-in before its password is checked; counts wrong passwords."""

    lockout: throttle.Lockout | None = None

    @sensitive_variables()
    def clean(self):
        username = self.cleaned_data.get("username")
        if username is None or not self.cleaned_data.get("password"):
            return super().clean()  # a missing field: no password is checked, nothing to count
        self.lockout = throttle.lockout(self.request, username)
        if self.lockout is not None:
            raise ValidationError(self.lockout.message, code="throttled")
        try:
            cleaned = super().clean()
        except ValidationError:
            # No user: a wrong password or an unknown (or inactive) account. A right password that
            # the form refuses anyway (a non-staff account on the admin's log-in) is no guess.
            if self.user_cache is None:
                throttle.record_failure(self.request, username)
            raise
        throttle.clear(username)
        return cleaned


class ThrottledAuthenticationForm(ThrottledLoginMixin, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(ThrottledLoginMixin, AdminAuthenticationForm):
    pass
