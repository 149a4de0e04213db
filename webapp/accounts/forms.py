"""Django's log-in forms (the site's and the admin's) with failed log-ins throttled (see throttle.py), and the form
that creates an invited user's account (invites.py)."""

from __future__ import annotations

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
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


class InviteForm(forms.ModelForm):
    """A new account for an invited user: a name (and an address, for the staff's own records); the password is
    the invited user's to set."""

    class Meta:
        model = get_user_model()
        fields = ["username", "email"]
        help_texts = {"email": "optional: for your records; nothing is sent"}

    def save(self, commit: bool = True):
        user = super().save(commit=False)
        user.set_unusable_password()
        if commit:
            user.save()
        return user
