"""Invitations: staff create an account and get a one-time link; the invited user sets their password there and
is logged in. Only staff with the permission to add users may invite; the link works once and expires."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.auth.tokens import default_token_generator
from django.test import Client
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from webapp.accounts.invites import INVITE_MAX_AGE, invite_tokens

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-new-password-42"
LINK = re.compile(r'id="invite-link" type="text" readonly value="(http://testserver/accounts/invite/[^"]+)"')


@pytest.fixture
def staff_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("boss", password="boss-pass-123456"))
    return client


def invite(staff_client, username: str = "newcomer", email: str = "") -> str:
    response = staff_client.post("/accounts/invite/", {"username": username, "email": email})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"], "the page with the link is not kept"
    return LINK.search(response.content.decode()).group(1)


def set_password(link: str, password: str = PASSWORD, again: str | None = None):
    """A fresh browser follows the link and sets the password; the response to the form and the client."""
    visitor = Client()
    form_page = visitor.get(link, follow=True)
    assert form_page.status_code == 200, form_page.content.decode()
    response = visitor.post(form_page.redirect_chain[-1][0], {"new_password1": password,
                                                               "new_password2": again or password})
    return response, visitor


def test_only_staff_who_may_add_users_can_invite(client, django_user_model, owner):
    assert client.get("/accounts/invite/").status_code == 404  # not logged in
    client.force_login(owner)
    assert client.get("/accounts/invite/").status_code == 404
    assert client.post("/accounts/invite/", {"username": "sneaky"}).status_code == 404

    clerk = django_user_model.objects.create_user("clerk", password="clerk-pass-123456", is_staff=True)
    client.force_login(clerk)
    refused = client.post("/accounts/invite/", {"username": "sneaky"})
    assert refused.status_code == 403
    assert not django_user_model.objects.filter(username="sneaky").exists()

    clerk.user_permissions.add(Permission.objects.get(codename="add_user"))
    client.force_login(django_user_model.objects.get(pk=clerk.pk))
    assert client.get("/accounts/invite/").status_code == 200


def test_the_invited_user_sets_a_password_once_and_lands_logged_in(staff_client, django_user_model):
    page = staff_client.get("/accounts/invite/").content.decode()
    assert "It works once, for 7 days" in page and "invite-link" not in page
    link = invite(staff_client, "newcomer", "new@example.org")
    invited = django_user_model.objects.get(username="newcomer")
    assert not invited.has_usable_password() and invited.email == "new@example.org"

    mismatch, _ = set_password(link, again="something-else-entirely-9")
    assert mismatch.status_code == 200 and "The two password fields didn’t match." in mismatch.content.decode()

    response, visitor = set_password(link)
    assert response.status_code == 302 and response["Location"] == "/jobs/"
    landing = visitor.get("/jobs/")
    assert landing.status_code == 200 and landing.context["user"].get_username() == "newcomer"
    assert "Welcome, newcomer: your password is set and you are logged in." in landing.content.decode()
    assert Client().login(username="newcomer", password=PASSWORD)

    # The link is spent.
    again = Client().get(link, follow=True)
    assert again.status_code == 410 and "This invitation link does not work" in again.content.decode()


def test_the_link_expires_and_a_password_reset_token_is_no_invitation(staff_client, django_user_model):
    invite(staff_client, "late")
    user = django_user_model.objects.get(username="late")
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    now = invite_tokens._num_seconds(invite_tokens._now())
    secret = invite_tokens.secret
    within = invite_tokens._make_token_with_timestamp(user, now - int(INVITE_MAX_AGE.total_seconds()) + 3600, secret)
    expired = invite_tokens._make_token_with_timestamp(
        user, now - int((INVITE_MAX_AGE + timedelta(hours=1)).total_seconds()), secret)
    assert Client().get(f"/accounts/invite/{uid}/{within}/", follow=True).status_code == 200
    for token in (expired, default_token_generator.make_token(user), "1-garbage"):
        response = Client().get(f"/accounts/invite/{uid}/{token}/", follow=True)
        assert response.status_code == 410, token
        assert "older than 7 days" in response.content.decode()


def test_a_name_taken_or_malformed_is_refused_with_the_reason(staff_client, owner, django_user_model):
    taken = staff_client.post("/accounts/invite/", {"username": "owner"})
    assert taken.context["form"].errors == {"username": ["A user with that username already exists."]}
    assert "invite-link" not in taken.content.decode()
    bad = staff_client.post("/accounts/invite/", {"username": "no spaces please"})
    assert list(bad.context["form"].errors) == ["username"]
    assert "Enter a valid username" in bad.context["form"].errors["username"][0]
    assert not django_user_model.objects.filter(username="no spaces please").exists()


def test_the_admins_user_list_links_to_the_invitation_page(staff_client):
    assert 'href="/accounts/invite/">Invite a user (one-time link)</a>' in staff_client.get(
        "/admin/auth/user/").content.decode()
