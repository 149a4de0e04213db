"""Invitations: staff bring in a user without an e-mail server.

Staff name the new account; it is created without a usable password, and staff get a one-time link
to hand over. The link opens a page where the invited user sets their password and is then logged
in. The token is Django's password-reset token with its own salt and age limit: it is a hash of the
account's password and last log-in, so it stops working once the password is set (it works once),
and it expires after ``INVITE_MAX_AGE``. Nothing about the link is stored: staff see it once.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.tokens import PasswordResetTokenGenerator
from django.http import HttpRequest
from django.urls import reverse
from django.utils.crypto import constant_time_compare
from django.utils.encoding import force_bytes
from django.utils.http import base36_to_int, urlsafe_base64_encode

INVITE_MAX_AGE = timedelta(days=7)


def max_age_words() -> str:
    days = INVITE_MAX_AGE.days
    return f"{days} day{'' if days == 1 else 's'}" if days else f"{INVITE_MAX_AGE.total_seconds() / 3600:g} hours"


class InviteTokenGenerator(PasswordResetTokenGenerator):
    """A password-reset token under another salt (a reset link is no invitation, nor the reverse) that expires
    after ``INVITE_MAX_AGE`` instead of PASSWORD_RESET_TIMEOUT."""

    key_salt = "webapp.accounts.invites.InviteTokenGenerator"

    def check_token(self, user: AbstractBaseUser | None, token: str | None) -> bool:
        if not (user and token):
            return False
        try:
            timestamp = base36_to_int(token.split("-")[0])
        except ValueError:
            return False
        if self._num_seconds(self._now()) - timestamp > INVITE_MAX_AGE.total_seconds():
            return False
        return any(constant_time_compare(self._make_token_with_timestamp(user, timestamp, secret), token)
                   for secret in (self.secret, *self.secret_fallbacks))


invite_tokens = InviteTokenGenerator()


def invite_link(request: HttpRequest, user: AbstractBaseUser) -> str:
    """The absolute one-time link that lets ``user`` set their password."""
    path = reverse("invite-accept", args=[urlsafe_base64_encode(force_bytes(user.pk)), invite_tokens.make_token(user)])
    return request.build_absolute_uri(path)
