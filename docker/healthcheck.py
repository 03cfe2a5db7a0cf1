#!/usr/bin/env python3
"""Docker HEALTHCHECK: exit 0 when the node's ``/healthz`` answers 200, else 1.

Reads ``METRICS_PORT`` (default 9108); ``HEALTHCHECK_URL`` overrides the whole URL.
Prints the node's one-line reason, which ``docker inspect`` shows under ``.State.Health``.
Standard library only, so it runs in a second even while the node is busy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0
HEALTHY, UNHEALTHY = 0, 1


def healthz_url(environ: dict[str, str] | os._Environ[str]) -> str:
    if environ.get("HEALTHCHECK_URL"):
        return environ["HEALTHCHECK_URL"]
    port = environ.get("METRICS_PORT") or "9108"
    return f"http://127.0.0.1:{port}/healthz"


def check(url: str, timeout_s: float = TIMEOUT_S) -> tuple[int, str]:
    """``(exit code, one line)`` for the health endpoint at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return HEALTHY, response.read(500).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as exc:
        body = exc.read(500).decode("utf-8", "replace").strip()
        return UNHEALTHY, f"HTTP {exc.code}: {body}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return UNHEALTHY, f"no answer from {url}: {reason} (is the node running?)"


def main() -> int:
    code, line = check(healthz_url(os.environ))
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
