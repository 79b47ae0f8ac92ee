"""The `sentinel` command as a real subprocess: `run` (import-time errors, serving,
configuration errors), `config`, `--version`, and the example in every --help."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from helpers import clean_env, first_response, free_port, stop, wait_for

from sentinel import Config, ConfigError, _run_factory, instrument
from sentinel._version import __version__
from sentinel.cli import build_parser

SENTINEL = [sys.executable, "-m", "sentinel.cli"]
CANARY = "Zq8vK2mX9pL4wR7tB1nC6yH3"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENTINEL_", "OTEL_"))}
    # The test's own PYTHONPATH stays after: a copy of sentinel put there is the one run.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
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
    # ... and one sentence for a person, after the report: the exception and its line.
    sentence = result.stderr.splitlines()[-1]
    assert sentence.startswith("sentinel run: importing 'brokenapp:app' raised KeyError")
    assert f"{tmp_path / 'brokenapp.py'}:4" in sentence


def _human_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("{")]


def test_missing_module_is_said_in_one_sentence_and_not_reported(tmp_path: Path) -> None:
    """A module that does not exist is a mistake in the command, not an exception of the
    app's: no report (none with the typo as its service), only one sentence that says what
    was not found, where Python looked and what to do."""
    result = subprocess.run(
        [*SENTINEL, "run", "nosuch.mod:app"],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [sentence] = result.stderr.splitlines()
    assert sentence.startswith("sentinel run: cannot import 'nosuch.mod:app': ")
    assert "no module named 'nosuch'" in sentence
    assert f"the working directory {tmp_path}" in sentence
    assert "PYTHONPATH" in sentence


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("shop.mian:app", "has no module 'mian'; did you mean 'shop.main'?"),
        ("shop.main:ap", "has no attribute 'ap'; did you mean 'app'?"),
        ("shop.main:settings", "is not an ASGI callable: dict; its ASGI apps: 'app'"),
    ],
    ids=["module", "attribute", "not an app"],
)
def test_an_app_that_is_not_there_is_one_line_on_a_console_too(
    tmp_path: Path, target: str, says: str
) -> None:
    """A typo in MODULE:APP, with the console log format a terminal gets: the one line that
    says what is missing and what comes close, and no report (with the typo for its service)
    and no traceback before it."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "main.py").write_text(
        "async def app(scope, receive, send): ...\n\nsettings = {'debug': False}\n"
    )
    result = subprocess.run(
        [*SENTINEL, "run", target],
        env=_env(tmp_path, SENTINEL_LOG_FORMAT="console"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [sentence] = result.stderr.splitlines()
    assert sentence.startswith("sentinel run: ") and sentence.endswith(says), sentence


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


def _refused_before_import(
    tmp_path: Path, arguments: list[str], **env: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``sentinel run *arguments`` in ``tmp_path``, where ``loudapp.py`` marks that it was
    imported: what the command said, and the file the import would have made."""
    imported = tmp_path / "imported"
    (tmp_path / "loudapp.py").write_text(
        f"from pathlib import Path\nPath({str(imported)!r}).touch()\n"
        "async def app(scope, receive, send): ...\n"
    )
    result = subprocess.run(
        [*SENTINEL, "run", *arguments],
        env=_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, imported


def test_a_web_concurrency_that_is_no_integer_is_named_with_its_value(tmp_path: Path) -> None:
    """WEB_CONCURRENCY (uvicorn's number of workers when --workers is not given) that is no
    integer: exit status 2 before the app is imported, in one line naming the variable and
    its value, not --workers; with --workers given it is not read, as by uvicorn."""
    result, imported = _refused_before_import(
        tmp_path, ["loudapp:app", "--port", "0"], WEB_CONCURRENCY="abc"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "sentinel run: WEB_CONCURRENCY must be an integer (the number of worker processes): 'abc'\n"
    )
    assert not imported.exists()
    given = subprocess.run(
        [*SENTINEL, "run", "nosuchmodule:app", "--workers", "2"],
        env=_env(tmp_path, WEB_CONCURRENCY="abc"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert given.returncode == 1, given.stderr  # the missing module, said as usual
    assert "WEB_CONCURRENCY" not in given.stderr


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--bogus-flag"], "No such option"),
        (["--port", "abc"], "'abc' is not a valid integer"),
        (["--env-file", "nosuch.env"], "Path 'nosuch.env' does not exist"),
    ],
)
def test_a_bad_server_option_is_uvicorns_usage_error_before_the_app_is_imported(
    tmp_path: Path, options: list[str], says: str
) -> None:
    """The options after MODULE:APP go to uvicorn: a bad one gets uvicorn's own one-line
    error and exit status 2, before the app is imported, with no traceback and no report."""
    result, imported = _refused_before_import(tmp_path, ["loudapp:app", *options])
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and options[-1] in result.stderr
    assert "Traceback" not in result.stderr and not _json_lines(result.stderr + result.stdout)
    assert not imported.exists()


@pytest.mark.parametrize(
    ("arguments", "app", "options"),
    [
        (["--port", "8000", "mypkg.main:app"], "mypkg.main:app", ["--port", "8000"]),
        (
            ["--reload", "mypkg.main:app", "--port", "8000"],
            "mypkg.main:app",
            ["--reload", "--port", "8000"],
        ),
        (["--host", "x:app", "--port=8000", "y:app"], "y:app", ["--host", "x:app", "--port=8000"]),
        (
            ["--reload-dir", "src", "--no-access-log", "--", "y:app"],
            "y:app",
            ["--reload-dir", "src", "--no-access-log"],
        ),
        (["--bogus", "y:app", "--workers", "2"], "y:app", ["--bogus", "--workers", "2"]),
        (
            ["--metrics-port", "9464", "y:app", "--reload"],
            "y:app",
            ["--metrics-port", "9464", "--reload"],
        ),
        (["y:app", "--port", "8000"], "y:app", ["--port", "8000"]),
    ],
    ids=[
        "value",
        "flag",
        "a value like an app",
        "end of options",
        "unknown option",
        "unknown option with a value",
        "after",
    ],
)
def test_uvicorn_options_may_come_before_the_app_as_uvicorn_takes_them(
    arguments: list[str], app: str, options: list[str]
) -> None:
    """`sentinel run --port 8000 mypkg.main:app`, the order uvicorn accepts: the app is the
    first word that is no option nor an option's value, and the options go to uvicorn in
    their order (one uvicorn does not know takes no value: uvicorn names it)."""
    parsed = build_parser().parse_args(["run", *arguments])
    assert (parsed.app, parsed.server_options) == (app, options)


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["--metrics-port", "9464", "loudapp:app"], "No such option '--metrics-port'"),
        (["--prot", "8000", "loudapp:app"], "No such option '--prot'"),
        (["--prot", "8000", "loudapp"], "No such option '--prot'"),
        (["loudapp:app", "--location=eu"], "No such option '--location'"),
    ],
)
def test_an_unknown_option_is_named_not_taken_for_the_app(
    tmp_path: Path, arguments: list[str], says: str
) -> None:
    """`sentinel run --metrics-port 9464 app:app`: uvicorn's usage error names the option,
    not "9464" as the app, and an option named like a sentinel setting points at its
    variable; exit status 2 before the app is imported."""
    result, imported = _refused_before_import(tmp_path, arguments)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "must be given as" not in result.stderr
    variable = {"--metrics-port": "SENTINEL_METRICS_PORT", "--location=eu": "SENTINEL_LOCATION"}
    for option, name in variable.items():
        assert (name in result.stderr) == (option in arguments), result.stderr
    assert "Traceback" not in result.stderr and not imported.exists()


@pytest.mark.parametrize("arguments", [["--port", "8000"], ["--port"], ["--reload", "--"]])
def test_run_with_options_and_no_app_names_the_app_as_missing(
    capsys: pytest.CaptureFixture[str], arguments: list[str]
) -> None:
    """Options and no app: the app is what is missing, not an option argparse does not know."""
    from sentinel.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", *arguments])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: the following argument is required: MODULE:APP (e.g. mypkg.main:app)\n"
    )


def test_run_serves_with_the_options_given_before_the_app(tmp_path: Path) -> None:
    """`sentinel run --host 127.0.0.1 --port P envapp:app` serves on that port; a bad option
    before the app is uvicorn's usage error, before the app is imported."""
    (tmp_path / "envapp.py").write_text(_PID_APP)
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "envapp:app"]
    with _running(args, _env(tmp_path), tmp_path) as process:
        response = first_response(process, f"http://127.0.0.1:{port}/")
    assert response.status_code == 200
    result, imported = _refused_before_import(tmp_path, ["--port", "abc", "loudapp:app"])
    assert result.returncode == 2, result.stderr
    assert "'abc' is not a valid integer" in result.stderr and not imported.exists()


def test_run_with_a_missing_multiprocess_directory_says_so(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR naming nothing: exit 2 before anything starts, naming the
    directory and what to do."""
    missing = tmp_path / "metrics"
    result = subprocess.run(
        [*SENTINEL, "run", "x:app", "--workers", "2"],
        env=_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(missing)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"sentinel run: PROMETHEUS_MULTIPROC_DIR names {str(missing)!r}, which does not exist"
    )
    assert "create it" in result.stderr


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


def test_run_with_reload_serves_the_served_processs_counts(tmp_path: Path) -> None:
    """With --reload the app runs in a child process uvicorn restarts on changes, while the
    process started supervises: the metrics endpoint shows the child's requests (the
    supervisor's own empty counts would have taken the port)."""
    (tmp_path / "reloaded.py").write_text(
        textwrap.dedent(
            """
            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route

            async def hello(request):
                return PlainTextResponse("hello")

            app = Starlette(routes=[Route("/hello", hello)])
            """
        )
    )
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            *SENTINEL,
            "run",
            "reloaded:app",
            "--port",
            str(port),
            "--reload",
            "--reload-dir",
            str(tmp_path),
        ],
        env=_env(tmp_path, SENTINEL_METRICS_PORT=str(metrics_port)),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert first_response(process, f"{url}/hello", timeout=30).status_code == 200
        for _ in range(3):
            assert httpx.get(f"{url}/hello", timeout=5).status_code == 200
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    counted = re.findall(r'sentinel_http_requests_total\{[^}]*route="/hello"[^}]*\} (\S+)', scraped)
    assert sum(float(value) for value in counted) >= 3, scraped


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


def test_run_serves_an_app_with_its_own_sentinels_settings_and_watches(tmp_path: Path) -> None:
    """An app that instruments itself with settings of its own (service, isolate mode),
    served by `sentinel run` in one process: its request's environment write is reported
    under the app's service and kept from the rest of the process, as under plain uvicorn
    (the factory used to install a sentinel from the environment over the app's, whose
    watches then saw no request)."""
    (tmp_path / "ownsettings.py").write_text(
        textwrap.dedent(
            """
            import os

            import sentinel
            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route

            async def point(request):
                os.environ["BACKEND"] = "replica-7"
                return PlainTextResponse("pointed")

            async def backend(request):
                return PlainTextResponse(os.environ.get("BACKEND", "unset"))

            app = sentinel.instrument(
                Starlette(routes=[Route("/point", point), Route("/backend", backend)]),
                service="shop",
                mutation_mode="isolate",
            )
            """
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [*SENTINEL, "run", "ownsettings:app", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        first_response(process, f"{url}/backend")
        assert httpx.get(f"{url}/point").text == "pointed"
        assert httpx.get(f"{url}/backend").text == "unset"
    finally:
        stop(process)
    _, stderr = process.communicate(timeout=15)
    mutations = [r for r in _json_lines(stderr) if r["event"] == "global_state_mutated"]
    assert len(mutations) == 1, stderr
    assert mutations[0]["service"] == "shop" and mutations[0]["route"] == "/point"


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
    # What to do, as the sidecar and the merged view say it.
    assert f"cannot bind 127.0.0.1:{metrics_port}" in warnings[0]["detail"]
    assert "SENTINEL_METRICS_PORT" in warnings[0]["detail"]


def test_a_metrics_port_that_is_the_apps_port_is_refused_before_the_app_is_imported(
    tmp_path: Path,
) -> None:
    """SENTINEL_METRICS_PORT equal to uvicorn's --port on addresses that overlap: exit status
    2 in one line naming both and the port, before the app is imported or a directory made,
    not uvicorn's "address already in use" once started. On another address (127.0.0.2),
    the same port serves the app and the metrics side by side."""
    import socket

    imported = tmp_path / "imported"
    (tmp_path / "loudapp.py").write_text(
        f"from pathlib import Path\nPath({str(imported)!r}).touch()\n" + _PID_APP
    )
    (tmp_path / "tmp").mkdir()
    port = free_port()
    overlapping = [  # (SENTINEL_METRICS_HOST, --host, --workers)
        ("127.0.0.1", "127.0.0.1", "1"),
        ("localhost", "127.0.0.1", "1"),
        ("127.0.0.1", "localhost", "2"),
    ]
    for metrics_host, host, workers in overlapping:
        options = ["--host", host, "--port", str(port), "--workers", workers]
        result = subprocess.run(
            [*SENTINEL, "run", "loudapp:app", *options],
            env=_env(
                tmp_path,
                SENTINEL_METRICS_PORT=str(port),
                SENTINEL_METRICS_HOST=metrics_host,
                TMPDIR=str(tmp_path / "tmp"),
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            f"sentinel run: SENTINEL_METRICS_PORT and --port are both {port}, on addresses "
            f"that overlap (the metrics endpoint on {metrics_host}, the app on {host}): give "
            "one of them another port\n"
        )
        assert not imported.exists() and os.listdir(tmp_path / "tmp") == []
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            return  # no 127.0.0.2 here (all of 127/8 is loopback on Linux)
    env = _env(tmp_path, SENTINEL_METRICS_PORT=str(port), SENTINEL_METRICS_HOST="127.0.0.2")
    process = subprocess.Popen(
        [*SENTINEL, "run", "loudapp:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first_response(process, f"http://127.0.0.1:{port}/").status_code == 200
        scraped = httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=5).text
    finally:
        stop(process)
    assert "sentinel_http_requests_total" in scraped


@pytest.mark.parametrize(
    ("metrics_host", "host", "dual_stack", "refused"),
    [
        ("127.0.0.1", "127.0.0.1", False, True),
        ("0.0.0.0", "127.0.0.1", False, True),
        ("127.0.0.1", "0.0.0.0", False, True),
        ("localhost", "localhost", False, True),
        ("127.0.0.2", "127.0.0.1", False, False),
        ("::1", "127.0.0.1", False, False),
        ("0.0.0.0", "::1", False, False),
        # uvicorn binds "::" for IPv4 too with workers or --reload, not in one process.
        ("127.0.0.1", "::", True, True),
        ("127.0.0.1", "::", False, False),
        ("::", "127.0.0.1", False, True),  # the endpoint's "::" takes IPv4 too
        ("::", "::1", False, True),
        # A host name is not looked up: it overlaps a wildcard only.
        ("0.0.0.0", "app.internal", False, True),
        ("127.0.0.1", "app.internal", False, False),
    ],
)
def test_which_addresses_of_one_port_overlap(
    metrics_host: str, host: str, dual_stack: bool, refused: bool
) -> None:
    """Which pairs of the metrics endpoint's and the app's addresses `sentinel run` refuses
    on one port: those where the second bind would fail."""
    from sentinel.cli import _port_conflict

    config = Config(metrics_port=8000, metrics_host=metrics_host)
    options = {"port": 8000, "host": host, "uds": None, "fd": None}
    conflict = _port_conflict(options, config, dual_stack=dual_stack)
    assert (conflict is not None) == refused
    # Port 0 is any free port, and a socket file or an inherited socket takes no port.
    for changes in ({"port": 0}, {"uds": "/run/app.sock"}, {"fd": 3}):
        assert _port_conflict({**options, **changes}, config, dual_stack=dual_stack) is None
    assert _port_conflict(options, Config(metrics_port=0), dual_stack=dual_stack) is None


# -- --version, and an example in every --help that runs (or at least parses) ---------------------

LONG_RUNNING = {
    "run": "serves until it is stopped",
    "sidecar": "serves until it is stopped",
    "demo": "plays the incident for its duration, with Prometheus when installed",
    "gate": "asks a Prometheus server",
}
"""Commands whose examples are parsed only; every other example is run."""
SHELL_OPERATORS = {">", ">>", "|", "&&", ";", "<"}


def _help_pages() -> dict[str, argparse.ArgumentParser]:
    """ "sentinel" and every command and sub-command below it, found in the parser."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, subparser in action.choices.items():
                    walk(f"{name} {command}", subparser)

    walk("sentinel", build_parser())
    return found


def _examples(help_text: str) -> list[str]:
    """The commands after "Example:" (on that line, or one per indented line below it)."""
    lines = help_text.splitlines()
    examples: list[str] = []
    for index, line in enumerate(lines):
        match = re.match(r"\s*Examples?:\s*(.*)$", line)
        if match is None:
            continue
        block = [match.group(1)] if match.group(1) else []
        for following in lines[index + 1 :]:
            if not following.startswith(" ") or not following.strip():
                break
            block.append(following.strip())
        joined = "\n".join(block).replace("\\\n", " ")
        examples.extend(command for command in joined.splitlines() if command)
    return examples


class Example(NamedTuple):
    environment: dict[str, str]
    arguments: list[str]
    """After "sentinel"."""
    stdout_file: str | None


def _split(example: str) -> Example:
    tokens = shlex.split(example)
    environment: dict[str, str] = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        environment[name] = value
    stdout_file = None
    for index, token in enumerate(tokens):
        if token in SHELL_OPERATORS:
            assert token == ">", f"only > is understood here: {example!r}"
            stdout_file = tokens[index + 1]
            tokens = tokens[:index]
            break
    assert tokens and tokens[0] == "sentinel", example
    return Example(environment, tokens[1:], stdout_file)


EXAMPLES = [
    (page, example)
    for page, parser in sorted(_help_pages().items())
    for example in _examples(parser.format_help())
]


def test_version_prints_the_package_version() -> None:
    """`sentinel --version` prints `sentinel <version>` from sentinel._version."""
    result = subprocess.run(
        [*SENTINEL, "--version"], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0
    assert result.stdout == f"sentinel {__version__}\n"


@pytest.mark.parametrize("page", sorted(_help_pages()))
def test_every_help_has_an_example_that_parses(page: str) -> None:
    """Every command's and sub-command's --help (found in the parser) shows an example, and
    each example is accepted by that parser, as the page's command."""
    parser = _help_pages()[page]
    examples = _examples(parser.format_help())
    assert examples, f"`{page} --help` has no Example line"
    for example in examples:
        arguments = _split(example).arguments
        try:
            parsed = build_parser().parse_args(arguments)
        except SystemExit:
            pytest.fail(f"the example of `{page} --help` does not parse: {example}")
        assert " ".join(["sentinel", *arguments]).startswith(page), example
        if parsed.command == "run":
            _run_factory.parse_target(parsed.app)


def test_long_running_commands_are_commands() -> None:
    """The commands whose examples are only parsed exist (the list cannot go stale)."""
    assert {page.split()[-1] for page in _help_pages()} >= set(LONG_RUNNING)


@pytest.mark.parametrize(
    ("page", "example"),
    [
        (page, example)
        for page, example in EXAMPLES
        if build_parser().parse_args(_split(example).arguments).command not in LONG_RUNNING
    ],
)
def test_the_examples_run(page: str, example: str, tmp_path: Path) -> None:
    """Each example of a command that finishes by itself runs in an empty directory with a
    clean environment, exits 0 and writes what it says (on stdout or into files)."""
    split = _split(example)
    assert not any(token.startswith("/") for token in split.arguments), (
        f"an example that writes outside its directory is not run: {example}"
    )
    result = subprocess.run(
        [*SENTINEL, *split.arguments],
        cwd=tmp_path,
        env=clean_env(**split.environment),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{example}\n{result.stderr}"
    assert result.stderr == ""
    assert result.stdout or any(tmp_path.iterdir()), f"{example} wrote nothing"
    if split.stdout_file is not None:
        assert result.stdout.strip(), example


# -- sentinel config ------------------------------------------------------------------------------


def _config(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SENTINEL, "config", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_shows_each_value_and_where_it_came_from() -> None:
    """SENTINEL_*, OTEL_* (a key of OTEL_RESOURCE_ATTRIBUTES too), the --app argument and
    defaults; values as sentinel.Config resolves them."""
    result = _config(
        "--json",
        "--app",
        "mypkg.main:app",
        SENTINEL_LOCATION="fra",
        SENTINEL_LOCATIONS="fra, iad",
        OTEL_RESOURCE_ATTRIBUTES="service.version=2024.06.1,deployment.environment=staging",
        OTEL_TRACES_EXPORTER="console",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    config = report["config"]
    assert config["location"] == {"value": "fra", "source": "SENTINEL_LOCATION"}
    assert config["locations"] == {"value": ["fra", "iad"], "source": "SENTINEL_LOCATIONS"}
    assert config["version"] == {
        "value": "2024.06.1",
        "source": "service.version in OTEL_RESOURCE_ATTRIBUTES",
    }
    assert config["environment"]["source"] == "deployment.environment in OTEL_RESOURCE_ATTRIBUTES"
    assert config["service"] == {"value": "mypkg.main", "source": "--app"}
    assert config["traces"] == {"value": True, "source": "OTEL_TRACES_EXPORTER"}
    assert config["metrics_port"] == {"value": 9464, "source": "default"}
    assert list(config) == [field.name for field in dataclasses.fields(Config)]
    assert report["traces_export"]["exporters"]["value"] == ["console"]
    assert report["sentinel_version"] == __version__
    # A service variable wins over the app's module, as under `sentinel run`.
    named = json.loads(_config("--json", "--app", "x:app", OTEL_SERVICE_NAME="shop").stdout)
    assert named["config"]["service"] == {"value": "shop", "source": "OTEL_SERVICE_NAME"}


def test_config_table_is_the_default() -> None:
    """Without --json: a table a person reads, with the same values and sources."""
    result = _config(SENTINEL_LOCATION="fra", SENTINEL_MUTATION_MODE="isolate")
    assert result.returncode == 0, result.stderr
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if len(cells := [cell.strip() for cell in line.strip("│ ").split("│")]) == 3
    }
    assert rows["location"] == ["fra", "SENTINEL_LOCATION"]
    assert rows["mutation_mode"] == ["isolate", "SENTINEL_MUTATION_MODE"]
    assert rows["records_per_second"] == ["5xx=20, 4xx=5, 3xx=2, 2xx=2", "default"]
    assert "span export" not in result.stdout  # traces are off


def test_config_masks_secrets() -> None:
    """Credentials in the OTLP endpoint (user information, query) and every OTLP header
    value are masked, in the table and in JSON; header names and the host stay readable."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://user:{CANARY}@collector.example:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": (
            f"https://{CANARY}@collector.example:4318/v1/traces?api_key={CANARY}&tenant=7"
        ),
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer%20{CANARY},x-team=shop",
        "SENTINEL_SERVICE": f"shop password={CANARY}",
    }
    table = _config(**env)
    as_json = _config("--json", **env)
    for result in (table, as_json):
        assert result.returncode == 0, result.stderr
        assert CANARY not in result.stdout
        assert "collector.example:4318/v1/traces" in result.stdout
        assert "x-team" in result.stdout and "authorization" in result.stdout
    export = json.loads(as_json.stdout)["traces_export"]
    assert export["endpoint"]["source"] == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    assert export["headers"]["source"] == "OTEL_EXPORTER_OTLP_HEADERS"
    assert all(value.startswith("[scrubbed len=") for value in export["headers"]["value"].values())


def test_config_shows_a_malformed_otlp_header_entry_masked_and_prints_no_warning() -> None:
    """``x-api-key: <key>`` (": " for "="), the common mistake: OpenTelemetry's parser drops
    the entry with a warning that quotes it. ``config`` shows the entry masked, under
    ``<not name=value>``, and writes the warning nowhere."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key: {CANARY},x-team=shop",
    }
    table = _config(**env)
    as_json = _config("--json", **env)
    for result in (table, as_json):
        assert result.returncode == 0, result.stderr
        assert CANARY not in result.stdout + result.stderr
        assert "Header format invalid" not in result.stderr
    headers = json.loads(as_json.stdout)["traces_export"]["headers"]["value"]
    assert set(headers) == {"x-team", "<not name=value>"}
    assert headers["<not name=value>"].startswith(f"[scrubbed len={len('x-api-key: ' + CANARY)} ")


def test_config_endpoint_is_resolved_as_the_otlp_exporter_resolves_it() -> None:
    """The HTTP exporter appends /v1/traces to the base endpoint; gRPC takes it as it is."""
    http = json.loads(
        _config("--json", OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318/").stdout
    )
    assert http["traces_export"]["endpoint"]["value"] == "http://collector:4318/v1/traces"
    grpc = json.loads(
        _config(
            "--json",
            OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317",
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        ).stdout
    )
    assert grpc["traces_export"]["exporters"]["value"] == ["otlp (grpc)"]
    assert grpc["traces_export"]["endpoint"]["value"] == "http://collector:4317"


def test_config_names_variables_nothing_reads() -> None:
    """A misspelt SENTINEL_* variable is named, with the one probably meant (its value is
    not shown)."""
    result = _config("--json", SENTINEL_LOCATON="fra", SENTINEL_SOMETHING_ELSE=CANARY)
    unknown = json.loads(result.stdout)["unknown_variables"]
    assert unknown == [
        {"variable": "SENTINEL_LOCATON", "did_you_mean": "SENTINEL_LOCATION"},
        {"variable": "SENTINEL_SOMETHING_ELSE", "did_you_mean": None},
    ]
    table = _config(SENTINEL_LOCATON="fra").stdout
    assert "SENTINEL_LOCATON is set, but sentinel reads no such variable; did you mean " in table
    assert CANARY not in result.stdout


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("SENTINEL_ENV", "SENTINEL_ENVIRONMENT"),
        ("SENTINEL_LOC", "SENTINEL_LOCATION"),
        ("SENTINEL_ENVIROMENT", "SENTINEL_ENVIRONMENT"),
        ("SENTINEL_METRIC_PORT", "SENTINEL_METRICS_PORT"),
        ("SENTINEL_SERVICE_NAME", "SENTINEL_SERVICE"),
        ("sentinel_location", "SENTINEL_LOCATION"),
        ("SENTINEL_DSN", None),
        ("SENTINEL_FOO", None),
        ("SENTINEL_METRICS", None),  # the host or the port: nothing is guessed
        ("SENTINEL_LOG_LEVEL", None),
    ],
)
def test_config_suggests_a_variable_by_what_follows_the_prefix(
    variable: str, meant: str | None
) -> None:
    """The part after SENTINEL_ is compared, which all share: a name it begins (ENV), a near
    spelling, or one it extends; nothing when none is close (SENTINEL_DSN is no
    SENTINEL_VERSION)."""
    [unknown] = json.loads(_config("--json", **{variable: "1"}).stdout)["unknown_variables"]
    assert unknown == {"variable": variable, "did_you_mean": meant}


@pytest.mark.parametrize(
    "variables",
    [{"SENTINEL_METRICS_PORT": "lots"}, {"OTEL_TRACES_EXPORTER": "zipkin"}],
    ids=["sentinel", "otel"],
)
def test_config_invalid_value_is_the_middlewares_message(
    variables: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit status 2, nothing on stdout, and the message instrument() raises, naming the
    variable."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        instrument(_plain_app)
    result = _config(**variables)
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(caught.value) in result.stderr
    assert next(iter(variables)) in result.stderr


async def _plain_app(scope: Any, receive: Any, send: Any) -> None: ...


@pytest.mark.parametrize(
    ("command", "output_is", "says"),
    [
        ("rules", "a directory", '"--output" names a directory, not a file'),
        ("alertmanager", "a directory", '"--output" names a directory, not a file'),
        ("dashboards", "a file", '"--output" names a file, not a directory'),
    ],
)
def test_an_output_of_the_wrong_kind_is_one_line_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, output_is: str, says: str
) -> None:
    """``-o`` naming a directory where a file goes, or a file where a directory goes: one
    line naming the path, exit status 2, nothing written."""
    pytest.importorskip("grafana_foundation_sdk")
    from sentinel.cli import main

    target = tmp_path / "out"
    if output_is == "a file":
        target.write_text("mine\n")
    else:
        target.mkdir()
    assert main([command, "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"sentinel {command}: {says}: {str(target)!r}\n"
    assert (target.read_text() == "mine\n") if output_is == "a file" else not any(target.iterdir())


def test_an_output_that_cannot_be_written_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-o`` below a file (so its directory cannot be made): one line with the reason,
    exit status 2 (for the gate, 1 would mean "stop the rollout")."""
    from sentinel.cli import main

    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "rules.yaml"
    assert main(["rules", "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sentinel rules: cannot write: ") and "Traceback" not in err
    assert err.count("\n") == 1


def test_run_without_an_app_names_what_is_missing_and_only_that(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``sentinel run`` alone: the app is required, the uvicorn options are not."""
    from sentinel.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sentinel run [-h] MODULE:APP [UVICORN OPTIONS ...]\n")
    assert err.endswith(
        "error: the following argument is required: MODULE:APP (e.g. mypkg.main:app)\n"
    )


def test_demo_help_names_every_variable_it_ignores() -> None:
    """The demo counts in its own process: its help says a PROMETHEUS_MULTIPROC_DIR left
    in the shell is ignored, beside the SENTINEL_* and OTEL_* variables."""
    help_text = " ".join(_help_pages()["sentinel demo"].format_help().split())
    assert "reads no SENTINEL_* or OTEL_* variable, and ignores PROMETHEUS_MULTIPROC_DIR" in (
        help_text
    )


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_demo_port_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], port: str
) -> None:
    """A port no socket can have is refused before anything starts, showing the value."""
    from sentinel.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--port", port])
    assert exit_.value.code == 2
    assert f"argument --port: a port is 0-65535: {port!r}" in capsys.readouterr().err


def test_run_says_once_that_the_multiprocess_directory_holds_an_earlier_run(
    tmp_path: Path,
) -> None:
    """A given PROMETHEUS_MULTIPROC_DIR with files in it before any worker started: one
    line naming the directory and what to do; an empty one: nothing."""
    earlier, fresh = tmp_path / "earlier", tmp_path / "fresh"
    earlier.mkdir()
    fresh.mkdir()
    for name in ("counter_41.db", "gauge_max_41.db", "sentinel_tenants_41_1.json"):
        (earlier / name).write_text("")
    said = {}
    for directory in (earlier, fresh):
        result = subprocess.run(
            [*SENTINEL, "run", "nosuchmodule:app"],
            env=_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        said[directory] = [line for line in result.stderr.splitlines() if "earlier run" in line]
    [line] = said[earlier]
    assert line.startswith(
        f"sentinel run: PROMETHEUS_MULTIPROC_DIR names {str(earlier)!r}, which holds 3 files "
        "of an earlier run"
    )
    assert "empty it between runs" in line
    assert said[fresh] == []


def test_run_with_workers_leaves_no_directory_behind_when_the_app_is_missing(
    tmp_path: Path,
) -> None:
    """`sentinel run MODULE:APP --workers 2` for a module that is not there: status 1, and
    the temporary directory it made for the workers is removed."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = subprocess.run(
        [*SENTINEL, "run", "nosuchmodule:app", "--workers", "2"],
        env=_env(tmp_path, TMPDIR=str(temporary)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "no module named 'nosuchmodule'" in result.stderr
    assert os.listdir(temporary) == []


# -- what uvicorn does once it runs, done before the app is imported ------------------------------


@contextlib.contextmanager
def _running(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """`sentinel run ARGS` in a session of its own, stopped with SIGINT (its whole session
    killed if it will not go), its stderr readable by communicate() afterwards."""
    process = subprocess.Popen(
        [*SENTINEL, "run", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


_PID_APP = """
import os

async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_reads_the_sentinel_variables_of_the_env_file(workers: str, tmp_path: Path) -> None:
    """`--env-file` goes to uvicorn, which loads it only once it runs: sentinel run loads
    it first, as uvicorn does (a variable already set keeps its value), so its SENTINEL_*
    variables configure sentinel too: the metrics port, the release, the location."""
    dotenv = pytest.importorskip("dotenv")  # uvicorn's --env-file needs python-dotenv
    (tmp_path / "envapp.py").write_text(_PID_APP)
    metrics_port = free_port()
    (tmp_path / "my.env").write_text(
        f"SENTINEL_METRICS_PORT={metrics_port}\nSENTINEL_METRICS_HOST=127.0.0.1\n"
        "SENTINEL_VERSION=v2\nSENTINEL_LOCATION=fra\n"
    )
    env = _env(tmp_path, SENTINEL_LOCATION="iad")  # set: the file does not replace it
    del env["SENTINEL_METRICS_PORT"]
    env["PYTHONPATH"] += os.pathsep + str(Path(dotenv.__file__).parent.parent)
    port = free_port()
    options = ["--host", "127.0.0.1", "--port", str(port), "--workers", workers]
    with _running(["envapp:app", "--env-file", "my.env", *options], env, tmp_path) as process:
        first_response(process, f"http://127.0.0.1:{port}/")
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    _, stderr = process.communicate(timeout=10)
    assert re.search(r'sentinel_build_info\{[^}]*version="v2"', scraped), scraped
    assert re.search(r'sentinel_location_requests_total\{[^}]*location="iad"', scraped), scraped
    assert 'location="fra"' not in scraped
    assert "Loading environment from 'my.env'" in stderr  # uvicorn loads it too


def test_run_names_each_variable_it_does_not_read_once_and_serves(tmp_path: Path) -> None:
    """A misspelt SENTINEL_* variable (in the environment or the --env-file) is one line on
    stderr at the start, with the one probably meant as `sentinel config` says it; once
    for the run, not once per worker, and the app is served all the same."""
    pytest.importorskip("dotenv")
    (tmp_path / "envapp.py").write_text(_PID_APP)
    (tmp_path / "my.env").write_text("SENTINEL_ENV=production\n")
    port = free_port()
    env = _env(tmp_path, SENTINEL_LOCATON="fra")
    args = ["envapp:app", "--env-file", "my.env", "--port", str(port), "--workers", "2"]
    with _running(args, env, tmp_path) as process:
        assert first_response(process, f"http://127.0.0.1:{port}/").status_code == 200
    _, stderr = process.communicate(timeout=10)
    assert [line for line in stderr.splitlines() if "no such variable" in line] == [
        "sentinel run: SENTINEL_ENV is set, but sentinel reads no such variable; "
        "did you mean SENTINEL_ENVIRONMENT?",
        "sentinel run: SENTINEL_LOCATON is set, but sentinel reads no such variable; "
        "did you mean SENTINEL_LOCATION?",
    ]


_NO_DOTENV = """raise ModuleNotFoundError("No module named 'dotenv'", name="dotenv")\n"""
"""A dotenv.py found before python-dotenv: importing it fails as when it is not installed."""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_with_an_env_file_and_no_python_dotenv_says_so_before_the_import(
    workers: str, tmp_path: Path
) -> None:
    """Without python-dotenv (the Quick start does not install it), `--env-file` is one line
    that names the file and what to install, exit status 2, before the app is imported: not
    the app's KeyError for a variable of the file, nor a report of uvicorn's import."""
    imported = tmp_path / "imported"
    (tmp_path / "envapp.py").write_text(
        f"import os\nfrom pathlib import Path\nPath({str(imported)!r}).touch()\n"
        "TOKEN = os.environ['API_TOKEN_SECRET']\n" + _PID_APP
    )
    (tmp_path / "app.env").write_text("API_TOKEN_SECRET=s3cr3t\n")
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "dotenv.py").write_text(_NO_DOTENV)
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), env["PYTHONPATH"]])
    result = subprocess.run(
        [*SENTINEL, "run", "envapp:app", "--env-file", "app.env", "--workers", workers],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"sentinel run: --env-file needs python-dotenv, which is not installed in {sys.prefix}: "
        "'app.env' was not loaded (pip install python-dotenv, then start again)\n"
    )
    assert not imported.exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_imports_the_app_from_app_dir(workers: str, tmp_path: Path) -> None:
    """`--app-dir sub` puts sub first on sys.path, as uvicorn does, before sentinel run
    imports the app, and the workers import it from there too."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "otherapp.py").write_text(_PID_APP)
    port = free_port()
    args = ["otherapp:app", "--app-dir", "sub", "--port", str(port), "--workers", workers]
    with _running(args, _env(tmp_path), tmp_path) as process:
        response = first_response(process, f"http://127.0.0.1:{port}/")
    _, stderr = process.communicate(timeout=10)
    assert response.status_code == 200, stderr
    assert "unhandled_exception" not in stderr


def _unwritable_directory(tmp_path: Path) -> Path:
    """A directory this user cannot create a file in: one without write permission, or,
    for root, whom permissions do not stop, /sys (sysfs creates no file for anyone)."""
    import tempfile

    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if not os.access(directory, os.W_OK):
        return directory
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        return Path("/sys")
    pytest.skip("no directory this user cannot write to")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_with_a_multiprocess_directory_it_cannot_write_says_so(
    workers: str, tmp_path: Path
) -> None:
    """PROMETHEUS_MULTIPROC_DIR naming a directory no metric file can be created in (a
    read-only file system, no permission): exit 2 before anything starts, with one sentence
    naming the directory, the reason and what to do, not prometheus-client's traceback."""
    unwritable = _unwritable_directory(tmp_path)
    result = subprocess.run(
        [*SENTINEL, "run", "x:app", "--workers", workers],
        env=_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(unwritable)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [sentence] = result.stderr.splitlines()
    assert sentence.startswith(
        f"sentinel run: PROMETHEUS_MULTIPROC_DIR names {str(unwritable)!r}, where "
        "prometheus-client cannot create its metric files ("
    )
    assert "give a directory this user" in sentence


def test_run_says_so_when_a_metric_file_cannot_be_created(tmp_path: Path) -> None:
    """A metric file that cannot be created once sentinel starts (the directory's file
    system filled or made read-only since it was checked): exit 2, one sentence, no
    traceback."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    failing_install = textwrap.dedent(
        f"""
        import errno, sys
        import sentinel._runtime
        from sentinel.cli import main

        def install(*args, **kwargs):
            path = {str(metrics / "counter_1.db")!r}
            raise OSError(errno.EROFS, "Read-only file system", path)

        sentinel._runtime.install = install
        sys.exit(main(["run", "x:app"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", failing_install],
        env=_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(metrics)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"sentinel run: PROMETHEUS_MULTIPROC_DIR names {str(metrics)!r}, where "
        "prometheus-client cannot create its metric files (Read-only file system): give a "
        f"directory this user (uid {os.getuid()}) can write to, or leave "
        "PROMETHEUS_MULTIPROC_DIR unset (sentinel run --workers N makes a fresh one)\n"
    )


@pytest.mark.parametrize("variable", ["PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"])
def test_an_empty_multiprocess_directory_is_unset_for_prometheus_client_too(
    variable: str, tmp_path: Path
) -> None:
    """PROMETHEUS_MULTIPROC_DIR= (empty) is unset to sentinel, and now to prometheus-client
    too, which took any value for multiprocess mode and wrote counter_<pid>.db and the
    like into the working directory."""
    (tmp_path / "plainapp.py").write_text(_PID_APP)
    port, metrics_port = free_port(), free_port()
    env = _env(
        tmp_path,
        SENTINEL_METRICS_PORT=str(metrics_port),
        SENTINEL_METRICS_HOST="127.0.0.1",
        **{variable: ""},
    )
    with _running(["plainapp:app", "--port", str(port)], env, tmp_path) as process:
        first_response(process, f"http://127.0.0.1:{port}/")
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    _, stderr = process.communicate(timeout=10)
    assert sorted(path.name for path in tmp_path.glob("*.db")) == [], stderr
    assert re.search(r"sentinel_http_requests_total\{[^}]*\} 1\.0", scraped), scraped


# -- signals while the app is imported, reloads ---------------------------------------------------


def _start_slow_import(tmp_path: Path, *options: str) -> subprocess.Popen[str]:
    """`sentinel run slowapp:app OPTIONS`, returned once it is importing the app (which
    takes 60 s), with TMPDIR in tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    importing = tmp_path / "importing"
    (tmp_path / "slowapp.py").write_text(
        f"import pathlib, time\npathlib.Path({str(importing)!r}).touch()\ntime.sleep(60)\n"
        "async def app(scope, receive, send): ...\n"
    )
    process = subprocess.Popen(
        [*SENTINEL, "run", "slowapp:app", "--port", str(free_port()), *options],
        env=_env(tmp_path, TMPDIR=str(tmp_path / "tmp")),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if not wait_for(importing.exists, timeout=30):
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the app was never imported: {process.communicate(timeout=10)[1]}")
    return process


def _signal_and_wait(process: subprocess.Popen[str], signum: int) -> str:
    process.send_signal(signum)
    try:
        return process.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        pytest.fail("sentinel run did not end on the signal")


def test_ctrl_c_while_the_app_is_imported_exits_130_and_blames_no_one(tmp_path: Path) -> None:
    """Ctrl-C during a slow import is the operator's: status 130, no exception report and
    no sentence telling to fix the app."""
    process = _start_slow_import(tmp_path)
    stderr = _signal_and_wait(process, signal.SIGINT)
    assert process.returncode == 130, stderr
    assert "unhandled_exception" not in stderr and "sentinel run:" not in stderr
    assert "Traceback" not in stderr


def test_sigterm_while_the_app_is_imported_leaves_no_directory_behind(tmp_path: Path) -> None:
    """SIGTERM while the app is imported, with --workers 2: the process ends by the signal
    as before, and the directory made for the workers is removed first."""
    process = _start_slow_import(tmp_path, "--workers", "2")
    assert os.listdir(tmp_path / "tmp")  # the workers' directory, made before the import
    stderr = _signal_and_wait(process, signal.SIGTERM)
    assert process.returncode == -signal.SIGTERM, stderr
    assert os.listdir(tmp_path / "tmp") == []


def _run_dirs(temporary: Path) -> list[Path]:
    return sorted(temporary.glob("sentinel-run-*"))


def test_a_directory_a_killed_run_left_behind_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """The directory `sentinel run --workers 2` makes holds the run's pid in a file the run
    keeps locked: a second run leaves the directory while the first runs, and once the first
    was killed (SIGKILL: nothing of it cleans up), the next run removes it, in one line."""
    import fcntl

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    importing = tmp_path / "importing"
    (tmp_path / "slowapp.py").write_text(
        f"import pathlib, time\npathlib.Path({str(importing)!r}).touch()\ntime.sleep(60)\n"
        "async def app(scope, receive, send): ...\n"
    )
    env = _env(tmp_path, TMPDIR=str(temporary))

    def next_run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SENTINEL, "run", "nosuchmodule:app", "--workers", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    killed = subprocess.Popen(
        [*SENTINEL, "run", "slowapp:app", "--port", str(free_port()), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert wait_for(importing.exists, timeout=30), "the app was never imported"
        [run_dir] = _run_dirs(temporary)
        owner = run_dir / "owner"
        assert owner.read_text() == f"{killed.pid}\n"
        with owner.open() as file, pytest.raises(BlockingIOError):
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        beside = next_run()
        assert beside.returncode == 1, beside.stderr
        assert _run_dirs(temporary) == [run_dir]
        assert "removed" not in beside.stderr
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=10)
    assert _run_dirs(temporary) == [run_dir]  # as SIGKILL left it
    after = next_run()
    assert after.returncode == 1, after.stderr
    assert os.listdir(temporary) == []
    [line] = [line for line in after.stderr.splitlines() if "removed" in line]
    assert line == (
        f"sentinel run: removed {run_dir}, left behind by an earlier run that was killed"
    )


def test_a_run_removes_only_directories_known_to_be_left_behind(tmp_path: Path) -> None:
    """What a run's start removes from the temporary directory: this user's run directories
    whose owner file it can lock, and those without one (made by an earlier sentinel) where
    nothing changed for a day; never one whose owner or a worker holds its file, a recent
    one without an owner file, a symlink or what it names, a file, another user's."""
    import fcntl
    import time

    temporary = tmp_path / "tmp"
    temporary.mkdir()

    def run_dir(
        name: str, *metric_files: str, owner: bool = True, within: Path = temporary
    ) -> Path:
        directory = within / name
        (directory / "metrics").mkdir(parents=True)
        for file in metric_files or ("counter_1.db",):
            (directory / "metrics" / file).write_text("")
        if owner:
            (directory / "owner").write_text("1\n")  # not locked: its run ended
        return directory

    run_dir("sentinel-run-ended")
    old = run_dir("sentinel-run-old", owner=False)
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in [old, *old.rglob("*")]:
        os.utime(path, (two_days_ago, two_days_ago))
    running = run_dir("sentinel-run-running")
    run_dir("sentinel-run-recent", owner=False)
    working = run_dir("sentinel-run-working", "counter_2.db", "sentinel_alive_2.lock")
    outside = run_dir("outside", within=tmp_path)
    (temporary / "sentinel-run-link").symlink_to(outside)
    (temporary / "sentinel-run-file").write_text("")
    run_dir("unrelated-run")
    kept = {"sentinel-run-running", "sentinel-run-recent", "sentinel-run-working"}
    kept |= {"sentinel-run-link", "sentinel-run-file", "unrelated-run"}
    if os.getuid() == 0:  # only root can make a directory of another user's
        os.chown(run_dir("sentinel-run-others"), 65534, 65534)
        kept.add("sentinel-run-others")
    held = [running / "owner", working / "metrics" / "sentinel_alive_2.lock"]
    with held[0].open() as owner, held[1].open() as worker:
        fcntl.flock(owner, fcntl.LOCK_EX)
        fcntl.flock(worker, fcntl.LOCK_EX)
        result = subprocess.run(
            [*SENTINEL, "run", "nosuchmodule:app", "--workers", "2"],
            env=_env(tmp_path, TMPDIR=str(temporary)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert {path.name for path in temporary.iterdir()} == kept
    assert (outside / "owner").exists() and (outside / "metrics" / "counter_1.db").exists()
    [line] = [line for line in result.stderr.splitlines() if "removed" in line]
    assert line == (
        f"sentinel run: removed 2 directories {temporary}/sentinel-run-*, left behind by "
        "earlier runs that were killed"
    )


def test_run_with_reload_says_why_each_reload_failed_and_ends_as_uvicorn(tmp_path: Path) -> None:
    """--reload with a factory that raises: each failing reload says why (a second,
    different error too), and once a change serves, SIGTERM ends it with status 0, as
    uvicorn, whatever failed before."""
    source = tmp_path / "src"
    source.mkdir()
    factory = source / "reloadfactory.py"
    working = "def make():\n    return app\n" + _PID_APP

    def failing(error: str) -> str:
        return f"def make():\n    raise {error}\n"

    factory.write_text(failing("RuntimeError('first problem')"))
    errors = tmp_path / "stderr.txt"
    port = free_port()
    (tmp_path / "tmp").mkdir()
    env = _env(tmp_path, TMPDIR=str(tmp_path / "tmp"))  # nothing left behind, whatever fails
    env["PYTHONPATH"] = str(source)
    with errors.open("w") as stderr_file:
        process = subprocess.Popen(
            [
                *SENTINEL,
                "run",
                "reloadfactory:make",
                "--factory",
                "--reload",
                "--reload-dir",
                str(source),
                "--port",
                str(port),
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/"

    def said() -> list[str]:
        lines = errors.read_text().splitlines()
        return [line for line in lines if line.startswith("sentinel run:")]

    def serves() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_for(lambda: len(said()) == 1, timeout=30), errors.read_text()
        factory.write_text(working)
        assert wait_for(serves, timeout=30), errors.read_text()
        factory.write_text(failing("KeyError('second problem')"))
        assert wait_for(lambda: len(said()) == 2, timeout=30), errors.read_text()
        factory.write_text(working)
        assert wait_for(serves, timeout=30), errors.read_text()
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    assert process.returncode == 0, errors.read_text()
    first, second = said()
    assert "raised RuntimeError: first problem" in first
    assert "raised KeyError: 'second problem'" in second
