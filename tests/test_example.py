"""The bundled example app behaves as the Quick start describes, each failure reported."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import httpx
import pytest

from sentinel import instrument
from sentinel.example import traffic
from sentinel.example.app import app
from sentinel.testing import Captured, serve


def test_example_routes_and_their_reports(captured: Captured) -> None:
    """Each demo route produces its documented status and phase."""
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/items/3").json() == {"id": 3, "name": "item 3"}
        assert httpx.get(f"{url}/items/-1").status_code == 404
        assert httpx.get(f"{url}/boom").status_code == 500
        assert httpx.get(f"{url}/background").status_code == 200
        assert httpx.get(f"{url}/handled").status_code == 503
        # The stream breaks off mid-response, as designed.
        with httpx.Client() as client, contextlib.suppress(httpx.HTTPError):
            client.get(f"{url}/stream")
    phases = {report["route"]: report["phase"] for report in captured.reports}
    assert phases == {
        "/boom": "request",
        "/background": "background",
        "/handled": "request",
        "/stream": "response",
    }


def test_the_websocket_route_works_on_the_default_install(captured: Captured) -> None:
    """`pip install sentinel-asgi` brings a websocket implementation uvicorn uses, so the
    example's /ws echoes under a real server, and a failing websocket handler is reported."""
    from importlib.metadata import requires

    import websockets.sync.client

    required = {
        name.split(">")[0].split("[")[0].strip()
        for name in requires("sentinel-asgi") or []
        if "extra ==" not in name
    }
    assert "websockets" in required
    with serve(instrument(app, sentinel=captured.sentinel)) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        with websockets.sync.client.connect(ws_url) as connection:
            connection.send("hello")
            assert connection.recv() == "hello"
        with websockets.sync.client.connect(ws_url) as connection:
            connection.send("boom")
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                connection.recv()
    [report] = captured.wait_for(1)
    assert (report["route"], report["exception_type"]) == (
        "/ws",
        "sentinel.example.app.BackendUnavailable",
    )


def test_the_environment_write_is_sent_even_as_the_failing_customers_request() -> None:
    """The demo's one write to os.environ falls on iad's first request after half time; when
    that request is also acme-logistics's (one iad request in 125), it is still the write (a
    demo once sent a plain request instead and showed no mutation), and acme's other
    requests keep their pattern."""
    count = 77 + 125 * 40  # iad's 5,077th request is acme-logistics's
    assert traffic.tenant_of("iad", count) == traffic.FAILING_TENANT
    kind, path = traffic.next_request("iad", count, traffic.MUTATION_AT, mutated=False)
    assert (kind, path) == ("mutation", "/locale?lang=de_DE")
    tenant = traffic.FAILING_TENANT
    assert traffic.tenant_request(tenant, count, 0.5, kind, path) == (kind, path)
    failing_count = 77 + 125 * 4  # acme's fifth request fails once it is failing
    assert traffic.tenant_request(tenant, failing_count, 0.5, "ok", "/x")[0] == "boom"
    assert traffic.tenant_request(tenant, failing_count, 0.1, "ok", "/x") == ("ok", "/")
    assert traffic.tenant_request("cust-0001", count, 0.5, "ok", "/x") == ("ok", "/x")


@pytest.mark.parametrize("module", ["sentinel.example.traffic", "sentinel.example.webhook"])
def test_the_example_commands_explain_themselves(module: str) -> None:
    """``--help`` of each runnable example prints its options (argparse formats help with
    %, so a percentage in it must be doubled)."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "options:" in result.stdout
