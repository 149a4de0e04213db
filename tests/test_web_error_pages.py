"""Error answers: pages in the site's layout for browsers (400, 403, 404, 413, 500), JSON for API clients,
and sizes in the binary units the limits are set in."""

from __future__ import annotations

import json

import pytest
from django.template.loader import render_to_string
from django.test import Client, RequestFactory
from django.urls import get_resolver, reverse
from raw_http import multipart_body, post_head, read_response
from web_services import start_web_server

from webapp.datasets.models import Dataset

LAYOUT = '<header class="topbar">'
SMALL_LIMIT_MB = 1  # the 413 server's dataset limit: requests over 2 MiB are refused


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


# ---------------------------------------------------------------- 404, 403, 400, 500


@pytest.mark.django_db
def test_a_missing_page_is_the_site_s_404_page_with_its_navigation(owner_client):
    response = owner_client.get("/datasets/987654/")
    assert response.status_code == 404
    page = response.content.decode()
    assert LAYOUT in page and 'href="/datasets/"' in page  # the layout, with the user's navigation
    assert "<title>Not found · splitlearn-studio</title>" in page
    assert "Not found (404)" in page and "<code>/datasets/987654/</code>" in page


@pytest.mark.django_db
def test_another_user_s_dataset_is_a_404_page_that_shows_nothing_of_it(owner_client, other):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from webapp.datasets.services import create_dataset

    theirs = create_dataset(other, SimpleUploadedFile("secret-notes.jsonl", b'{"text": "private"}\n'))
    response = owner_client.get(f"/datasets/{theirs.pk}/")
    assert response.status_code == 404
    page = response.content.decode()
    assert "Not found (404)" in page and "belongs to another user" in page
    assert "secret-notes" not in page and theirs.sha256 not in page


@pytest.mark.django_db
def test_an_unknown_api_path_answers_json(owner_client):
    response = owner_client.get("/api/no-such-thing/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "not found: /api/no-such-thing/"}


@pytest.mark.django_db
def test_a_refused_action_is_the_site_s_403_page_with_the_reason(client, django_user_model):
    # Staff may see the fleet; changing a trunk needs a permission this user lacks.
    staff = django_user_model.objects.create_user("watcher", is_staff=True)
    client.force_login(staff)
    response = client.post("/fleet/1/drain/", HTTP_ACCEPT="text/html")
    assert response.status_code == 403
    page = response.content.decode()
    assert LAYOUT in page and "Not allowed (403)" in page
    assert "Changing trunk servers needs the permission to change them" in page


@pytest.mark.django_db
def test_a_form_posted_without_its_csrf_token_explains_what_to_do(owner):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    response = client.post(reverse("datasets:add-demo"))
    assert response.status_code == 403
    page = response.content.decode()
    assert LAYOUT in page and "This form has expired (403)" in page and "Reload the page" in page
    assert not Dataset.objects.exists()


@pytest.mark.django_db
def test_a_bad_request_is_the_site_s_400_page():
    # A Host header the site does not serve is a suspicious request: 400 from Django's handler.
    response = Client().get("/accounts/login/", HTTP_HOST="not-this-site.example")
    assert response.status_code == 400
    page = response.content.decode()
    assert LAYOUT in page and "Bad request (400)" in page


def test_the_500_page_renders_without_a_request_or_context():
    page = render_to_string("500.html")
    assert LAYOUT in page and "Something went wrong on the server (500)" in page
    assert "Log out" not in page  # no user: no navigation


@pytest.mark.django_db
def test_the_configured_500_handler_answers_a_page_or_json():
    handler = get_resolver().resolve_error_handler(500)
    page = handler(RequestFactory().get("/jobs/", HTTP_ACCEPT="text/html"))
    assert page.status_code == 500 and "Something went wrong on the server (500)" in page.content.decode()
    api = handler(RequestFactory().get("/api/jobs/"))
    assert api.status_code == 500 and json.loads(api.content)["detail"].startswith("server error")


# ---------------------------------------------------------------- 413, before Django


@pytest.fixture(scope="module")
def small_limit_server(service_env, web_dirs):
    server = start_web_server({**service_env, "DATASET_MAX_UPLOAD_MB": str(SMALL_LIMIT_MB)},
                              web_dirs["logs"] / "error-pages.log")
    yield server
    server.stop()


def post_oversized(server, path: str, accept: str) -> tuple[int, bytes]:
    """A 3.5 MiB upload with a declared length; (status, body) of the answer."""
    body = multipart_body(3 * 1024 * 1024 + 512 * 1024)
    with post_head(server.port, f"Accept: {accept}\r\nContent-Length: {len(body)}\r\n", path=path) as sock:
        sock.sendall(body)
        return read_response(sock)


def test_an_oversized_upload_from_a_browser_is_the_site_s_413_page_in_mebibytes(small_limit_server):
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"  # what Chromium sends
    status, content = post_oversized(small_limit_server, "/datasets/upload/", accept)
    assert status == 413
    page = content.decode()
    assert LAYOUT in page and "<title>Upload too large · splitlearn-studio</title>" in page
    assert "The request body is 3.5 MiB; the limit is 2 MiB (datasets up to 1 MiB)." in page
    assert "Datasets may be up to 1 MiB" in page
    assert " MB" not in page


@pytest.mark.parametrize("path,accept", [("/api/datasets/", "text/html"), ("/datasets/upload/", "application/json")])
def test_an_oversized_upload_from_an_api_client_is_json_in_mebibytes(small_limit_server, path, accept):
    status, content = post_oversized(small_limit_server, path, accept)
    assert status == 413
    assert json.loads(content) == {"detail": "the request body is 3.5 MiB; the limit is 2 MiB (datasets up to "
                                             "1 MiB). Split the dataset or ask an administrator to raise "
                                             "DATASET_MAX_UPLOAD_MB"}
