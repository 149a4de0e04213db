"""Log-in throttling (webapp/accounts/throttle.py) on the site's and the admin's log-in pages,
counted in a real Redis; a Redis outage lets log-ins through."""

from __future__ import annotations

import socket
import time

import pytest
from django.core.cache import cache
from django.test import Client
from polling import wait_until

from webapp.accounts import throttle

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"
ADMIN_LOGIN = "/admin/login/"
PASSWORD = "a-long-password-1"
ACCOUNT_LOCKED = "Too many failed log-in attempts for this account; try again in"
ADDRESS_LOCKED = "Too many failed log-in attempts from your network address; try again in"
WRONG = "Please enter a correct username and password"


@pytest.fixture(autouse=True)
def throttle_cache(redis_server, settings):
    """The test Redis, in a database of its own (emptied here) so that the broker's keys stay."""
    location = redis_server.url.rsplit("/", 1)[0] + "/1"
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": location}}
    settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_FAILURE_IP_LIMIT, settings.LOGIN_LOCKOUT_S = 5, 20, 900
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # dozens of log-ins per test
    cache.clear()


@pytest.fixture
def ada(django_user_model):
    return django_user_model.objects.create_user("ada", password=PASSWORD)


def log_in(client: Client, username: str, password: str, url: str = LOGIN, address: str = "127.0.0.1"):
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=address)


def logged_in(client: Client) -> bool:
    return client.get("/jobs/").status_code == 200


def fail(client: Client, username: str, times: int, url: str = LOGIN, address: str = "127.0.0.1") -> None:
    for _ in range(times):
        page = log_in(client, username, "wrong-password", url, address)
        assert page.status_code == 200 and "correct username and password" in page.content.decode()


def test_five_wrong_passwords_lock_the_account_even_against_the_right_password(client, ada):
    fail(client, "ada", 5)
    page = log_in(client, "ada", PASSWORD)
    assert page.status_code == 429
    assert f"{ACCOUNT_LOCKED} 15 minutes." in page.content.decode()
    assert 890 <= int(page["Retry-After"]) <= 900
    assert not logged_in(client)


def test_the_message_says_how_much_of_the_window_is_left(client, ada):
    fail(client, "ada", 5)
    since_key = throttle._username_scope("ada").since_key
    cache.set(since_key, int(time.time()) - 61, timeout=900)  # the first failure, a minute ago
    page = log_in(client, "ada", PASSWORD)
    assert page.status_code == 429
    assert f"{ACCOUNT_LOCKED} 14 minutes." in page.content.decode()


def test_unknown_usernames_are_counted_too_so_the_lockout_reveals_nothing(client):
    fail(client, "nobody", 5)
    page = log_in(client, "nobody", "whatever")
    assert page.status_code == 429 and ACCOUNT_LOCKED in page.content.decode()


def test_usernames_that_differ_in_case_share_one_count(client, ada):
    fail(client, "Ada", 3)
    fail(client, "ADA", 2)
    assert log_in(client, "ada", PASSWORD).status_code == 429


def test_another_account_from_the_same_address_works_until_the_address_limit(client, ada, django_user_model,
                                                                             settings):
    settings.LOGIN_FAILURE_IP_LIMIT = 8
    django_user_model.objects.create_user("bob", password=PASSWORD)
    fail(client, "ada", 5)
    assert log_in(client, "ada", PASSWORD).status_code == 429

    assert log_in(client, "bob", PASSWORD).status_code == 302 and logged_in(client)
    client.post("/accounts/logout/")
    fail(client, "carol", 3)  # the address's 8th failure
    page = log_in(client, "bob", PASSWORD)
    assert page.status_code == 429 and ADDRESS_LOCKED in page.content.decode()
    assert not logged_in(client)

    elsewhere = Client()
    assert log_in(elsewhere, "bob", PASSWORD, address="192.0.2.7").status_code == 302
    assert log_in(Client(), "ada", PASSWORD, address="192.0.2.7").status_code == 429, "the account stays locked"


def test_addresses_of_one_ipv6_network_share_a_count(client, settings):
    settings.LOGIN_FAILURE_IP_LIMIT = 3
    for host in (1, 2, 3):
        fail(client, f"user{host}", 1, address=f"2001:db8:1:2::{host}")
    page = log_in(client, "user9", "x", address="2001:db8:1:2:ffff::9")
    assert page.status_code == 429 and ADDRESS_LOCKED in page.content.decode()
    assert log_in(client, "user9", "x", address="2001:db8:1:3::1").status_code == 200, "another /64"


def test_the_window_passing_lets_the_user_in(client, ada):
    fail(client, "ada", 5)
    scope = throttle._username_scope("ada")
    # The window's first failure 899 s ago: one second of it is left.
    cache.set(scope.since_key, int(time.time()) - 899, timeout=1)
    cache.touch(scope.count_key, timeout=1)
    page = log_in(client, "ada", PASSWORD)
    assert page.status_code == 429 and f"{ACCOUNT_LOCKED} 1 second." in page.content.decode()
    assert page["Retry-After"] == "1"
    wait_until(lambda: not cache.has_key(scope.count_key) and not cache.has_key(scope.since_key),
               "Redis expired the window's keys", timeout=10)
    assert log_in(client, "ada", PASSWORD).status_code == 302 and logged_in(client)


def test_a_successful_log_in_clears_the_accounts_failures(client, ada):
    fail(client, "ada", 4)
    assert log_in(client, "ada", PASSWORD).status_code == 302
    client.post("/accounts/logout/")
    fail(client, "ada", 4)
    assert log_in(client, "ada", PASSWORD).status_code == 302, "4 failures since the last success"
    client.post("/accounts/logout/")
    fail(client, "ada", 5)
    assert log_in(client, "ada", PASSWORD).status_code == 429


def test_the_admin_log_in_is_throttled_too(client, django_user_model):
    django_user_model.objects.create_user("root", password=PASSWORD, is_staff=True, is_superuser=True)
    for _ in range(3):
        assert "correct username and password for a staff account" in log_in(
            client, "root", "wrong", ADMIN_LOGIN).content.decode()
    fail(client, "root", 2)  # the site's log-in and the admin's share the count
    page = log_in(client, "root", PASSWORD, ADMIN_LOGIN)
    assert page.status_code == 429
    assert f"{ACCOUNT_LOCKED} 15 minutes." in page.content.decode()
    assert client.get("/admin/").status_code == 302, "not logged in"
    cache.clear()
    assert log_in(client, "root", PASSWORD, ADMIN_LOGIN).status_code == 302
    assert client.get("/admin/").status_code == 200


def test_a_non_staff_account_with_its_right_password_on_the_admin_is_not_a_guess(client, ada):
    for _ in range(6):
        assert log_in(client, "ada", PASSWORD, ADMIN_LOGIN).status_code == 200
    assert log_in(client, "ada", PASSWORD).status_code == 302


def test_a_redis_outage_lets_log_ins_through_and_is_logged(client, ada, settings, caplog):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": f"redis://127.0.0.1:{closed_port}/0"}}
    fail(client, "ada", 6)
    assert log_in(client, "ada", PASSWORD).status_code == 302 and logged_in(client)
    assert "log-in throttling is off for this attempt: the cache cannot be read" in caplog.text
    assert "a failed log-in was not counted" in caplog.text
