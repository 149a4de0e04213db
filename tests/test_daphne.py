"""daphne, the web server of `make run`, of the image and of `manage.py runserver`: it serves HTTP and
WebSockets once started, and stops promptly on SIGTERM with a WebSocket open."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from polling import wait_until
from web_services import start_web_server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from webapp.processes import PROJECT_ROOT, free_port

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff_cookie(client, django_user_model) -> str:
    staff = django_user_model.objects.create_user("staff", password="staff-pass-123", is_staff=True)
    client.force_login(staff)
    return f"sessionid={client.cookies['sessionid'].value}"


def open_fleet_socket(port: int, cookie: str):
    return connect(f"ws://127.0.0.1:{port}/ws/fleet/", open_timeout=30,
                   additional_headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{port}"})


def test_sigterm_stops_daphne_promptly_with_a_websocket_open(service_env, web_dirs, staff_cookie):
    server = start_web_server(service_env, web_dirs["logs"] / "daphne-sigterm.log")
    try:
        with open_fleet_socket(server.port, staff_cookie) as live:
            assert json.loads(live.recv(timeout=30))["type"] == "fleet"
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(30)
            stopped_after = time.monotonic() - started
            with pytest.raises(ConnectionClosed):
                live.recv(timeout=10)
    finally:
        server.stop()
    assert code == 0
    assert stopped_after < 10, f"daphne took {stopped_after:.1f} s to stop"
    # It closed the open socket itself rather than waiting for the client to leave.
    assert '"WSDISCONNECT /ws/fleet/"' in server.log()


def test_manage_runserver_serves_websockets_with_daphne(service_env, web_dirs, staff_cookie):
    """"daphne" first in INSTALLED_APPS: runserver is daphne's, serving ASGI_APPLICATION, WebSockets too."""
    port = free_port()
    log_path = web_dirs["logs"] / "runserver.log"
    process = subprocess.Popen([sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
                               cwd=PROJECT_ROOT, env={**os.environ, **service_env, "PYTHONUNBUFFERED": "1"},
                               stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, "runserver listening", timeout=120)
        assert "Starting ASGI/Daphne version 4.2.3 development server" in log_path.read_text()
        with open_fleet_socket(port, staff_cookie) as live:
            assert json.loads(live.recv(timeout=30))["type"] == "fleet"
    finally:
        process.terminate()
        process.wait(30)
