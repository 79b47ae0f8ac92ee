"""Small helpers shared by the test modules (processes, ports, request contexts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from sentinel._context import RequestContext


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[str]) -> None:
    """Stop a server process as an operator would (SIGINT), killing it if it will not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SENTINEL_*, OTEL_* and multiprocess variables, plus extra."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SENTINEL_", "OTEL_", "PROMETHEUS_MULTIPROC"))
    }
    env.update(extra)
    return env


def request_context(**changes: object) -> RequestContext:
    """A RequestContext for GET / in location fra, with ``changes`` applied."""
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
    context = RequestContext(scope, "GET", "fra", 0.0)
    context.route = "/"
    for name, value in changes.items():
        setattr(context, name, value)
    return context
