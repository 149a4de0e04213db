"""deploy/nginx rendered as the official nginx image renders it, for Debian's nginx binary in the tests.

When the image starts, its entrypoint sources ``/docker-entrypoint.d/*.envsh`` (18-splitlearn.envsh among
them), then ``20-envsubst-on-templates.sh`` runs ``envsubst`` over every ``/etc/nginx/templates/**/*.template``
into ``/etc/nginx/conf.d/``, with a SHELL-FORMAT that lists every variable of its environment: ``${NAME}`` and
``$NAME`` of a set variable are replaced, anything else stays (nginx's own lowercase ``$variables``). Here:
the same script through ``/bin/sh``, the same substitution in Python, into a directory laid out like
``/etc/nginx``, whose ``nginx.conf`` stands in for the image's (same structure: ``mime.types``, the http
block including ``conf.d/*.conf``), with every path inside the directory so nginx needs no system folder.

What differs from compose, and why: nginx listens on loopback ports instead of 80 and 443 (the tests run
side by side); the upstream is daphne's loopback address instead of ``web:8000``. ``nginx -t`` would resolve
a host name such as ``web`` if the shipped config named it in an ``upstream`` or a literal ``proxy_pass``;
it does not: it looks the name up per request through ``resolver`` (see default.conf.template), so the
config is valid whatever the upstream is, and here it is an address that needs no lookup.
``NGINX_LOCAL_RESOLVERS`` is what the image's 15-local-resolvers.envsh reads from /etc/resolv.conf.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NGINX_DEPLOY = ROOT / "deploy" / "nginx"
TEMPLATES = NGINX_DEPLOY / "templates"
ENTRYPOINT_SCRIPT = NGINX_DEPLOY / "18-splitlearn.envsh"
TEMPLATE_SUFFIX = ".template"
DEBIAN_MIME_TYPES = Path("/etc/nginx/mime.types")  # the image ships its own; Debian's nginx-common this one
# $NAME or ${NAME}, as envsubst reads them.
SHELL_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")

MAIN_CONFIG = """\
# Stands in for the nginx image's /etc/nginx/nginx.conf.
{user}worker_processes 1;
error_log {root}/error.log notice;
pid {root}/nginx.pid;

events {{
    worker_connections 256;
}}

http {{
    include mime.types;
    default_type application/octet-stream;
    access_log {root}/access.log;
    sendfile on;
    keepalive_timeout 65;
    client_body_temp_path {root}/temp/client_body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
    include conf.d/*.conf;
}}
"""


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if path is None:
        pytest.fail("nginx is not installed: `make test` installs Debian's package when run as root "
                    "(or: apt-get install --no-install-recommends nginx)")
    return path


def entrypoint_environment(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Source 18-splitlearn.envsh in ``env`` as the image's entrypoint does; stdout is then the resulting
    environment, NUL-separated, and stderr what the script said."""
    return subprocess.run(["sh", "-c", '. "$0" >&2 && env -0', str(ENTRYPOINT_SCRIPT)], env=env,
                          capture_output=True, timeout=30)


def envsubst(text: str, env: dict[str, str]) -> str:
    return SHELL_VARIABLE.sub(lambda match: env.get(match.group(1) or match.group(2), match.group(0)), text)


@dataclass
class RenderedConfig:
    root: Path  # stands in for /etc/nginx
    env: dict[str, str]  # the environment the templates were rendered with

    @property
    def main(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def conf_d(self) -> Path:
        return self.root / "conf.d"

    def command(self, *args: str) -> list[str]:
        return [nginx_binary(), "-p", f"{self.root}/", "-c", str(self.main), "-e", str(self.root / "error.log"),
                *args]

    def test(self) -> subprocess.CompletedProcess:
        """``nginx -t``: parse every file, open the certificates and paths; no daemon, no port bound."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=60)


def render(root: Path, *, upstream: str, static_root: Path, http_port: int, https_port: int | None = None,
           max_upload_mb: str = "50", https_public_port: int | None = None) -> RenderedConfig:
    """Render into ``root``; HTTPS when ``root/certs`` holds fullchain.pem and privkey.pem (TLS_CERT_DIR)."""
    nginx_binary()  # fails with what to install before anything else is missing (mime.types comes with it)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # From compose (docker-compose.yml, the nginx service):
        "DATASET_MAX_UPLOAD_MB": max_upload_mb,
        "SPLITLEARN_WEB_UPSTREAM": upstream,
        "SPLITLEARN_STATIC_ROOT": str(static_root),
        "SPLITLEARN_HTTPS_PUBLIC_PORT": str(https_public_port or https_port or 443),
        # From the image's 15-local-resolvers.envsh (unused: the upstream is an address).
        "NGINX_LOCAL_RESOLVERS": "127.0.0.1",
        # Loopback ports and this directory instead of the image's 80, 443 and /etc/nginx.
        "SPLITLEARN_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "SPLITLEARN_HTTPS_LISTEN": f"127.0.0.1:{https_port or 0}",
        "SPLITLEARN_TLS_CERTIFICATE": str(root / "certs" / "fullchain.pem"),
        "SPLITLEARN_TLS_CERTIFICATE_KEY": str(root / "certs" / "privkey.pem"),
    }
    sourced = entrypoint_environment(env)
    if sourced.returncode != 0:
        raise RuntimeError(f"18-splitlearn.envsh failed: {sourced.stderr.decode()}")
    rendered_env = dict(item.split("=", 1) for item in sourced.stdout.decode().split("\0") if "=" in item)
    for template in TEMPLATES.rglob(f"*{TEMPLATE_SUFFIX}"):
        output = root / "conf.d" / template.relative_to(TEMPLATES).with_suffix("")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(envsubst(template.read_text(), rendered_env))
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / "temp" / temp).mkdir(parents=True, exist_ok=True)
    shutil.copy(DEBIAN_MIME_TYPES, root / "mime.types")
    # As root the master starts its workers as another user, "nobody" by default, which cannot read a
    # test's private directories; the image's nginx.conf names its own user, "nginx", likewise.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(MAIN_CONFIG.format(root=root, user=user))
    return RenderedConfig(root=root, env=rendered_env)


@dataclass
class NginxProcess:
    process: subprocess.Popen
    config: RenderedConfig
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        return (self.config.root / "error.log").read_text(errors="replace")

    def access_log(self) -> str:
        path = self.config.root / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int:
        """SIGQUIT: the graceful stop the image uses (its STOPSIGNAL)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_nginx(config: RenderedConfig, port: int) -> NginxProcess:
    """nginx in the foreground on ``config``; returns once ``port`` accepts connections."""
    checked = config.test()
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(config.command("-g", "daemon off;"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    server = NginxProcess(process=process, config=config, port=port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"nginx did not start:\n{server.error_log()[-3000:]}")


def write_self_signed_certificate(directory: Path) -> bytes:
    """A throwaway certificate for 127.0.0.1 and localhost as ``directory``/fullchain.pem and privkey.pem
    (the file names TLS_CERT_DIR holds); returns the certificate, PEM, for a client to trust."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitlearn-studio test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fullchain.pem").write_bytes(pem)
    (directory / "privkey.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    (directory / "privkey.pem").chmod(0o600)
    return pem
