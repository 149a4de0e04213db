"""The site's icon: every page links it, and /favicon.ico (which browsers ask for anyway) leads to it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from conftest import PROJECT_ROOT

pytestmark = pytest.mark.django_db

ICON = "/static/favicon.svg"


def test_favicon_ico_leads_to_the_icon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 302 and response["Location"] == ICON
    icon = client.get("/favicon.ico", follow=True)
    assert icon.status_code == 200 and icon["Content-Type"].startswith("image/svg+xml")
    root = ET.fromstring(b"".join(icon.streaming_content))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (PROJECT_ROOT / "static" / "favicon.svg").is_file()


def test_pages_link_the_icon(client, django_user_model):
    link = f'<link rel="icon" href="{ICON}" type="image/svg+xml">'
    assert link in client.get("/accounts/login/").content.decode()
    client.force_login(django_user_model.objects.create_user("owner", password="owner-pass-123"))
    for path in ("/jobs/", "/datasets/", "/jobs/compare/"):
        assert link in client.get(path).content.decode(), path
