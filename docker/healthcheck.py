"""The health check of the sentinel image: ``python /opt/sentinel/healthcheck.py [TARGET ...]``.

A TARGET is ``http://HOST:PORT/PATH`` (healthy when it answers 2xx) or ``tcp://HOST:PORT``
(healthy when it accepts a connection: a bare connection is no request, so the app never
counts it). Without targets it checks the image's own command: sentinel's ``/healthz`` on the
metrics port (``SENTINEL_METRICS_PORT``, default 9464; 0 is off) and the app on port 8000.
Exits 0 when every target is healthy, else 1 with a line naming the first that is not.
Standard library only, so it runs wherever the image's Python does.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

APP_PORT = 8000
"""The port of the image's command (``sentinel run ... --port 8000``)."""
DEFAULT_METRICS_PORT = 9464
TIMEOUT_SECONDS = 3.0
MAX_REASON_BYTES = 1024


def default_targets(environ: Mapping[str, str]) -> list[str]:
    """What the image's own command serves, with the metrics port from ``environ``."""
    raw = environ.get("SENTINEL_METRICS_PORT", "").strip()
    metrics_port = int(raw) if raw else DEFAULT_METRICS_PORT
    targets = [f"tcp://127.0.0.1:{APP_PORT}"]
    if metrics_port:
        targets.insert(0, f"http://127.0.0.1:{metrics_port}/healthz")
    return targets


def problem(target: str, timeout: float = TIMEOUT_SECONDS) -> str | None:
    """Why ``target`` is not healthy, or None when it is."""
    address = urllib.parse.urlsplit(target)
    if address.scheme == "tcp" and address.hostname and address.port:
        try:
            socket.create_connection((address.hostname, address.port), timeout).close()
        except OSError as error:
            return f"{target}: no connection: {error}"
        return None
    if address.scheme == "http" and address.hostname:
        try:
            with urllib.request.urlopen(target, timeout=timeout) as response:
                status = int(response.status)
        except urllib.error.HTTPError as error:
            # sentinel's /healthz says why in its first line (a merged view's directory).
            with error:
                reason = error.read(MAX_REASON_BYTES).decode("utf-8", "replace")
            reason = reason.splitlines()[0].strip() if reason.strip() else ""
            return f"{target}: answered {error.code}" + (f": {reason}" if reason else "")
        except OSError as error:
            return f"{target}: no answer: {error}"
        return None if 200 <= status < 300 else f"{target}: answered {status}"
    return f"target must be http://HOST:PORT/PATH or tcp://HOST:PORT: {target!r}"


def main(argv: Sequence[str] | None = None) -> int:
    """Check the targets in ``argv`` (or the defaults); 0 when all are healthy."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        targets = arguments or default_targets(os.environ)
    except ValueError:
        raw = os.environ.get("SENTINEL_METRICS_PORT")
        print(f"SENTINEL_METRICS_PORT must be an integer: {raw!r}", file=sys.stderr)
        return 1
    for target in targets:
        reason = problem(target)
        if reason is not None:
            print(f"unhealthy: {reason}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
