"""`sentinel run` as a real subprocess: import-time errors, serving, configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import first_response, free_port, stop

SENTINEL = [sys.executable, "-m", "sentinel.cli"]
CANARY = "Zq8vK2mX9pL4wR7tB1nC6yH3"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENTINEL_", "OTEL_"))}
    env["PYTHONPATH"] = str(tmp_path)
    env["SENTINEL_METRICS_PORT"] = "0"
    env.update(extra)
    return env


def _json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def test_import_error_is_reported_and_exits_non_zero(tmp_path: Path) -> None:
    """Phase 5: an exception while importing the app is one report and exit status 1."""
    (tmp_path / "brokenapp.py").write_text(
        textwrap.dedent(
            """
            import os

            BACKEND = os.environ["BROKEN_APP_BACKEND"]  # KeyError at import time

            app = None
            """
        )
    )
    result = subprocess.run(
        [*SENTINEL, "run", "brokenapp:app", "--port", "0"],
        env=_env(tmp_path, SENTINEL_LOCATION="fra"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    records = _json_lines(result.stderr)
    [report] = [r for r in records if r["event"] == "unhandled_exception"]
    assert report["phase"] == "import"
    assert report["exception_type"] == "KeyError"
    assert report["location"] == "fra"
    assert report["service"] == "brokenapp"
    assert any(frame.get("module") == "brokenapp" and frame["in_app"] for frame in report["frames"])
    assert "Uvicorn running" not in result.stderr


def test_missing_module_is_reported(tmp_path: Path) -> None:
    """A module that does not exist is an import error too, reported with its name."""
    result = subprocess.run(
        [*SENTINEL, "run", "no_such_module_here:app"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [report] = [r for r in _json_lines(result.stderr) if r["event"] == "unhandled_exception"]
    assert report["exception_type"] == "ModuleNotFoundError"
    assert "no_such_module_here" in report["message"]


def test_malformed_target_and_bad_configuration_are_clear_errors(tmp_path: Path) -> None:
    """Bad input gets exit status 2 and a message that shows the bad value."""
    malformed = subprocess.run(
        [*SENTINEL, "run", "just_a_module"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert malformed.returncode == 2
    assert "'just_a_module'" in malformed.stderr
    bad_port = subprocess.run(
        [*SENTINEL, "run", "x:app"],
        env=_env(tmp_path, SENTINEL_METRICS_PORT="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_port.returncode == 2
    assert "SENTINEL_METRICS_PORT" in bad_port.stderr and "'lots'" in bad_port.stderr


def test_help_describes_every_command() -> None:
    """`sentinel --help` and `sentinel run --help` answer and exit 0."""
    top = subprocess.run([*SENTINEL, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "run" in top.stdout
    run = subprocess.run([*SENTINEL, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert "MODULE:APP" in run.stdout and "uvicorn" in run.stdout


@pytest.fixture(params=[[]])
def served(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    (tmp_path / "servedapp.py").write_text(
        textwrap.dedent(
            """
            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route


            class PaymentDeclined(Exception):
                pass


            async def ok(request):
                return PlainTextResponse("ok")


            async def pay(request):
                raise PaymentDeclined("card declined")


            app = Starlette(routes=[Route("/ok", ok), Route("/pay/{order}", pay)])
            """
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [
            *SENTINEL,
            "run",
            "servedapp:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *request.param,
        ],
        env=_env(tmp_path, SENTINEL_LOCATION="iad"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        first_response(process, f"{url}/ok")
        yield url, process
    finally:
        stop(process)


def test_run_serves_the_wrapped_app_and_reports_once(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    """Exceptions under `sentinel run` are one scrubbed JSON report; request records replace
    the access log."""
    url, process = served
    assert httpx.get(f"{url}/ok").text == "ok"
    response = httpx.get(f"{url}/pay/42?token={CANARY}")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0
    reports = [r for r in _json_lines(stderr) if r["event"] == "unhandled_exception"]
    assert len(reports) == 1, stderr
    [report] = reports
    assert report["exception_type"] == "servedapp.PaymentDeclined"
    assert report["route"] == "/pay/{order}"
    assert report["path"] == "/pay/42"
    assert report["location"] == "iad"
    assert report["service"] == "servedapp"
    assert "Exception in ASGI application" not in stderr
    assert CANARY not in stderr
    # The access log is replaced by scrubbed request records (first of each key kept).
    requests = [r for r in _json_lines(stderr) if r["event"] == "request"]
    assert {(r["route"], r["status"]) for r in requests} == {("/ok", 200), ("/pay/{order}", 500)}
    assert all("?" not in r["path"] for r in requests)
    assert '"GET /ok' not in stderr  # no uvicorn access-log line


@pytest.mark.parametrize("served", [[], ["--lifespan", "off"]], indirect=True)
def test_sigterm_drains_and_flushes_what_was_counted(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    """SIGTERM: uvicorn drains, sentinel writes the exception summary of the folded repeats
    (and every queued record) before the process ends, and the exit status is the one
    SIGTERM gives uvicorn; with and without the lifespan."""
    url, process = served
    for _ in range(15):  # 10 written in full, 5 folded into a summary not yet due
        assert httpx.get(f"{url}/pay/1").status_code == 500
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGTERM
    records = _json_lines(stderr)
    assert len([r for r in records if r["event"] == "unhandled_exception"]) == 10
    [summary] = [r for r in records if r["event"] == "exception_summary"]
    assert summary["occurrences"] == 5
    assert summary["exception_type"] == "servedapp.PaymentDeclined"


def test_run_does_not_wrap_an_app_that_brings_its_own_sentinel(tmp_path: Path) -> None:
    """An app that calls sentinel.instrument() itself, served by `sentinel run`, is counted
    once per request (one sentinel per app)."""
    (tmp_path / "selfwrapped.py").write_text(
        textwrap.dedent(
            """
            import sentinel
            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route

            async def ok(request):
                return PlainTextResponse("ok")

            app = sentinel.instrument(Starlette(routes=[Route("/ok", ok)]))
            """
        )
    )
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [*SENTINEL, "run", "selfwrapped:app", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(
            tmp_path, SENTINEL_METRICS_PORT=str(metrics_port), SENTINEL_METRICS_HOST="127.0.0.1"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first_response(process, f"http://127.0.0.1:{port}/ok")
        for _ in range(2):
            assert httpx.get(f"http://127.0.0.1:{port}/ok").text == "ok"
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    finally:
        stop(process)
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("sentinel_http_requests_total{")
    ]
    assert sum(counted) == 3


def test_metrics_port_taken_is_said_once(tmp_path: Path) -> None:
    """A metrics port already in use is reported once (a warning and a count), and the app
    is served all the same."""
    import socket

    (tmp_path / "plainapp.py").write_text(
        textwrap.dedent(
            """
            async def app(scope, receive, send):
                if scope["type"] == "http":
                    await send({"type": "http.response.start", "status": 200, "headers": []})
                    await send({"type": "http.response.body", "body": b"ok"})
            """
        )
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        port = free_port()
        process = subprocess.Popen(
            [*SENTINEL, "run", "plainapp:app", "--host", "127.0.0.1", "--port", str(port)],
            env=_env(
                tmp_path,
                SENTINEL_METRICS_PORT=str(metrics_port),
                SENTINEL_METRICS_HOST="127.0.0.1",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert first_response(process, f"http://127.0.0.1:{port}/").text == "ok"
        finally:
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
    warnings = [r for r in _json_lines(stderr) if r["event"] == "metrics_endpoint_unavailable"]
    assert len(warnings) == 1, stderr
    assert warnings[0]["port"] == metrics_port
