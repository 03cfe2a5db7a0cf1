"""A local nginx over TLS that answers like a dataset hub and its CDN, for HTTP(S) tests.

Two loopback servers with a self-signed certificate made for the test (``ca.pem``, trusted
through ``TPLR_CA_BUNDLE``, never by turning verification off):

- the *hub*: ``/datasets/OWNER/REPO/resolve/REV/PATH`` answers 302 to the CDN (as the
  hub does for stored files); ``OWNER/private`` requires ``Authorization: Bearer TOKEN``
  (401 otherwise); ``/api/…`` serves the tree-API JSON files the test writes;
  ``/files/…`` serves files directly; ``/forbidden/…`` answers 403.
- the *CDN*: ``/cdn/OWNER/REPO/PATH`` serves the files with ranges and ETags, answers 400
  to any request that carries an ``Authorization`` header (a token must never follow a
  redirect to another host), and paces ``/cdn/o/slow/`` to ``slow_rate`` per connection.

Every request is logged as ``PORT METHOD URI STATUS "RANGE" "AUTH" "IF-MATCH"``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NGINX = "/usr/sbin/nginx"
RESOLVE = "^/datasets/([^/]+)/([^/]+)/resolve/[^/]+/(.*)$"
LOG_FORMAT = '$server_port $request_method $uri $status "$http_range" "$http_authorization"'
LOG_FORMAT += ' "$http_if_match"'
TOKEN = "hf_test_token_not_a_secret"

CONF = """
{user}
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format t '{log_format}';
    access_log {log} t;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    ssl_certificate {tmp}/cert.pem;
    ssl_certificate_key {tmp}/key.pem;
    server {{
        listen 127.0.0.1:{hub} ssl;
        location /datasets/o/private/ {{
            if ($http_authorization != "Bearer {token}") {{ return 401; }}
            rewrite {resolve} https://127.0.0.1:{cdn}/cdn/$1/$2/$3 redirect;
        }}
        location /datasets/ {{
            rewrite {resolve} https://127.0.0.1:{cdn}/cdn/$1/$2/$3 redirect;
        }}
        location /api/ {{ root {www}; default_type application/json; }}
        location /files/ {{ root {www}; }}
        location /forbidden/ {{ return 403; }}
    }}
    server {{
        listen 127.0.0.1:{cdn} ssl;
        location /cdn/o/slow/ {{
            if ($http_authorization != "") {{ return 400; }}
            root {www};
            limit_rate {slow_rate};
        }}
        location /cdn/ {{
            if ($http_authorization != "") {{ return 400; }}
            root {www};
        }}
    }}
}}
"""


@dataclass
class Origin:
    hub_url: str  # https://127.0.0.1:PORT (the hub, HF_ENDPOINT)
    cdn_url: str
    www: Path  # files under www/cdn/OWNER/REPO/…, www/files/…, www/api/…
    ca_bundle: Path
    log: Path

    def repo_dir(self, owner: str, repo: str) -> Path:
        return self.www / "cdn" / owner / repo

    def requests(self) -> list[list[str]]:
        """The access log so far: [port, method, uri, status, range, auth, if-match]
        (nginx writes "-" for a header that was not sent)."""
        if not self.log.exists():
            return []
        return [shlex.split(line) for line in self.log.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_certificate(folder: Path) -> None:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


@contextlib.contextmanager
def nginx_origin(folder: Path, *, slow_rate: str = "1m") -> Iterator[Origin]:
    tmp, www = folder / "nginx", folder / "www"
    tmp.mkdir(parents=True)
    www.mkdir(parents=True)
    make_certificate(tmp)
    hub, cdn = free_port(), free_port()
    log = tmp / "access.log"
    conf = tmp / "nginx.conf"
    conf.write_text(
        CONF.format(
            tmp=tmp,
            www=www,
            hub=hub,
            cdn=cdn,
            log=log,
            token=TOKEN,
            slow_rate=slow_rate,
            resolve=RESOLVE,
            log_format=LOG_FORMAT,
            # workers read pytest's private tmp folders: as root, they run as root too
            user="user root;" if os.geteuid() == 0 else "",
        )
    )
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                for port in (hub, cdn):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {proc.stderr.read()!r}") from None
                time.sleep(0.05)
        yield Origin(
            hub_url=f"https://127.0.0.1:{hub}",
            cdn_url=f"https://127.0.0.1:{cdn}",
            www=www,
            ca_bundle=tmp / "cert.pem",
            log=log,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
