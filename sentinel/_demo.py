"""``sentinel demo``: the incident sentinel comes from, played against the example app.

The bundled example app, wrapped by sentinel, is served by uvicorn on 127.0.0.1, and a
traffic generator sends requests "from" three locations through the location header for
``duration`` seconds: ``fra`` and ``iad`` healthy (one failure in a thousand), ``sin`` a
small location where one request in five fails. The service's error ratio stays under 1%
while one location sees 20%: the failure that alerts tuned for the global rate miss. At the
end it prints what sentinel counted, per location, and the exceptions it reported.
"""

from __future__ import annotations

import http.client
import io
import json
import sys
import time
from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry

LOCATION_HEADER = "x-demo-location"
# Of every 100 requests: 48 from fra, 49 from iad, 3 from sin.
_LOCATIONS = ["fra"] * 48 + ["iad"] * 49 + ["sin"] * 3


def _path(location: str, count: int) -> str:
    """The path of a location's ``count``-th request."""
    if location == "sin":
        return "/boom" if count % 5 == 4 else f"/items/{count}"
    return "/boom" if count % 1000 == 999 else ("/" if count % 2 else f"/items/{count}")


def run_demo(duration: float, port: int, as_json: bool, max_requests: int = 200_000) -> int:
    """Serve the example app, play the traffic for ``duration`` seconds, print a summary."""
    from ._middleware import instrument
    from .example.app import app as example_app
    from .testing import serve

    records: list[dict[str, Any]] = []
    registry = CollectorRegistry()
    app = instrument(
        example_app,
        registry=registry,
        stream=io.StringIO(),
        sinks=(records.append,),
        metrics_port=0,
        location_header=LOCATION_HEADER,
        locations=("fra", "iad", "sin"),
    )
    sent: Counter[tuple[str, int]] = Counter()
    with serve(app, port=port, lifespan="off") as url:
        host, _, bound = url.rpartition("//")[2].partition(":")
        connection = http.client.HTTPConnection(host, int(bound), timeout=10)
        deadline = time.monotonic() + duration
        index = 0
        per_location: Counter[str] = Counter()
        while time.monotonic() < deadline and index < max_requests:
            location = _LOCATIONS[index % len(_LOCATIONS)]
            path = _path(location, per_location[location])
            per_location[location] += 1
            connection.request("GET", path, headers={LOCATION_HEADER: location})
            response = connection.getresponse()
            response.read()
            if response.will_close or response.status >= 500:
                # uvicorn closes the connection after an app's error (without saying so):
                # the next request opens a new one.
                connection.close()
            sent[(location, response.status)] += 1
            index += 1
            if not as_json and index % 2000 == 0:
                print(f"  {index} requests sent", file=sys.stderr, flush=True)
        connection.close()
        app.sentinel.flush(final=True)
    summary = _summary(registry, records, sent)
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print(summary)
    return 0


def _summary(
    registry: CollectorRegistry,
    records: list[dict[str, Any]],
    sent: Counter[tuple[str, int]],
) -> dict[str, Any]:
    counted: Counter[tuple[str, bool]] = Counter()
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "sentinel_http_requests_total":
                failed = sample.labels["code"].startswith("5")
                counted[(sample.labels["location"], failed)] += int(sample.value)
    locations = {}
    for location in sorted({location for location, _ in counted}):
        requests = counted[(location, False)] + counted[(location, True)]
        errors = counted[(location, True)]
        locations[location] = {
            "requests": requests,
            "errors": errors,
            "error_ratio": round(errors / requests, 4) if requests else 0.0,
            "sent": sum(n for (where, _), n in sent.items() if where == location),
        }
    total = sum(entry["requests"] for entry in locations.values())
    total_errors = sum(entry["errors"] for entry in locations.values())
    exceptions: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("event") == "unhandled_exception":
            entry = exceptions.setdefault(
                record["fingerprint"],
                {
                    "exception_type": record["exception_type"],
                    "written": 0,
                    "folded": 0,
                    "code": _app_line(record),
                },
            )
            entry["written"] += 1
        elif record.get("event") == "exception_summary" and record["fingerprint"] in exceptions:
            exceptions[record["fingerprint"]]["folded"] += record["occurrences"]
    return {
        "locations": locations,
        "global": {
            "requests": total,
            "errors": total_errors,
            "error_ratio": round(total_errors / total, 4) if total else 0.0,
        },
        "exceptions": exceptions,
    }


def _app_line(record: dict[str, Any]) -> str | None:
    for frame in reversed(record.get("frames", [])):
        if frame.get("in_app"):
            return f"{frame.get('file')}:{frame.get('line')} in {frame.get('function')}"
    return None


def _print(summary: dict[str, Any]) -> None:
    print("\nsentinel demo: what sentinel counted")
    print(f"{'location':<10}{'requests':>10}{'errors':>8}{'error ratio':>13}")
    rows = [*summary["locations"].items(), ("(service)", summary["global"])]
    for location, entry in rows:
        ratio = f"{entry['error_ratio']:.2%}"
        print(f"{location:<10}{entry['requests']:>10}{entry['errors']:>8}{ratio:>13}")
    print("\nexceptions reported (one fingerprint each; repeats folded into summaries):")
    for fingerprint, entry in summary["exceptions"].items():
        print(
            f"  {entry['exception_type']} [{fingerprint[:12]}] written {entry['written']}, "
            f"folded {entry['folded']}, at {entry['code']}"
        )
    print(
        "\nThe service's error ratio stays under 1% while sin fails one request in five:"
        " alerts tuned for the global rate miss it; `sentinel rules` pages for sin."
    )
