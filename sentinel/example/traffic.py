"""The incident sentinel comes from, as traffic against the example app.

``python -m sentinel.example.traffic --url http://127.0.0.1:8000 --duration 60`` sends
requests "from" three locations through the ``x-demo-location`` header, one at a time on a
keep-alive connection, and prints what it sent per location and status as JSON. The plan is
deterministic (the n-th request of a location is always the same), so a test can predict
what sentinel must count:

- ``fra`` and ``iad`` carry 97% of the traffic, healthy: one request in a thousand fails.
- ``sin`` carries 3%; healthy in the first quarter of the run, then one request in five
  fails, while the service's error ratio stays under 1%: alerts tuned for the global rate
  miss it.
- From 40% of the run on, one ``fra`` request in 500 fails in a middleware before routing.
- At half time one ``iad`` request writes an environment variable (once).
- From 60% of the run on, one ``iad`` request in 300 raises an exception type never seen
  before, as a new release would.
- With ``tenants`` (``--tenants``), every request names its customer in the
  ``x-demo-tenant`` header: 400 customers on a Zipf-like mix, and from 30% of the run on
  one mid-sized customer,
  ``acme-logistics`` (one ``fra``/``iad`` request in 125), has one request in five fail
  while its locations and the service look healthy.
- Two ``fra`` requests in five carry a bearer token (signed-in users). With ``deploy_url``
  (``--deploy-url``), from 80% of the run on ``fra``'s traffic goes there instead: the demo
  serves the staging build of the app at that address, which refuses every production
  token with 401.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

LOCATION_HEADER = "x-demo-location"
LOCATIONS = ("fra", "iad", "sin")
# Of every 100 requests: 48 from fra, 49 from iad, 3 from sin.
_ROTATION = ("fra",) * 48 + ("iad",) * 49 + ("sin",) * 3

SIN_FAILS_FROM = 0.25
EARLY_FAILURES_FROM = 0.4
MUTATION_AT = 0.5
NEW_EXCEPTION_FROM = 0.6
DEPLOY_AT = 0.8
TENANT_HEADER = "x-demo-tenant"
FAILING_TENANT = "acme-logistics"
TENANT_FAILS_FROM = 0.3
FAILING_TENANT_EVERY = 125
"""One ``fra``/``iad`` request in this many is ``acme-logistics``'s (0.8% of the traffic:
enough 5xx to stand out even in a short demo on a busy machine, far from the top)."""
_CUSTOMERS = 400
_GOLDEN = 0.6180339887498949
DEPLOY_LOCATION = "fra"
DEMO_TOKEN = "Bearer demo-production-token"  # not a secret: the demo's stand-in for one


def next_request(location: str, count: int, progress: float, mutated: bool) -> tuple[str, str]:
    """``(kind, path)`` of ``location``'s ``count``-th request at ``progress`` (0..1) of the
    run; ``mutated`` says whether the one environment write was already sent.

    Kinds: ``ok`` (200), ``boom`` (the handler raises), ``early`` (a middleware raises
    before routing), ``mutation`` (the handler writes an environment variable) and ``new``
    (the handler raises a type not seen before).
    """
    if location == "sin":
        failing = progress >= SIN_FAILS_FROM and count % 5 == 4
        return ("boom", "/boom") if failing else ("ok", f"/items/{count}")
    if count % 1000 == 999:
        return "boom", "/boom"
    if location == "fra" and progress >= EARLY_FAILURES_FROM and count % 500 == 250:
        return "early", "/reports/daily"
    if location == "iad":
        if progress >= MUTATION_AT and not mutated:
            return "mutation", "/locale?lang=de_DE"
        if progress >= NEW_EXCEPTION_FROM and count % 300 == 150:
            return "new", "/export?format=xlsx"
    return "ok", "/" if count % 2 else f"/items/{count}"


def tenant_of(location: str, count: int) -> str:
    """The customer of ``location``'s ``count``-th request: ``acme-logistics`` for one
    ``fra``/``iad`` request in ``FAILING_TENANT_EVERY``, else one of 400 customers, the first
    far busier than the last (log-uniform ranks, deterministic)."""
    if location != "sin" and count % FAILING_TENANT_EVERY == 77:
        return FAILING_TENANT
    uniform = (count * _GOLDEN + len(location) * 0.1) % 1.0
    return f"cust-{int(_CUSTOMERS**uniform):04d}"


def tenant_request(
    tenant: str, count: int, progress: float, kind: str, path: str
) -> tuple[str, str]:
    """``(kind, path)`` of a request of ``tenant``: ``acme-logistics``'s fail one in five from
    :data:`TENANT_FAILS_FROM` of the run on and are plain otherwise; the one environment
    write stays what it is, whoever's it is (it happens once)."""
    if tenant != FAILING_TENANT or kind == "mutation":
        return kind, path
    failing = progress >= TENANT_FAILS_FROM and (count // FAILING_TENANT_EVERY) % 5 == 4
    return ("boom", "/boom?backend=acme") if failing else ("ok", "/")


@dataclass
class Tally:
    """What the traffic generator sent and what it got back."""

    responses: Counter[tuple[str, int]] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failed_connections: int = 0

    @property
    def total(self) -> int:
        return sum(self.responses.values())

    def by_location(self) -> dict[str, dict[str, int]]:
        """``{location: {status: count}}`` with statuses as strings (JSON keys)."""
        result: dict[str, dict[str, int]] = {}
        for (location, status), count in sorted(self.responses.items()):
            result.setdefault(location, {})[str(status)] = count
        return result


def _address(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname:
        msg = f"url must be http://HOST[:PORT]: {url!r}"
        raise ValueError(msg)
    return parsed.hostname, parsed.port or 80


def play(
    url: str,
    duration: float,
    *,
    deploy_url: str | None = None,
    tenants: bool = False,
    max_requests: int = 1_000_000,
    stop: threading.Event | None = None,
    on_response: Callable[[str, int, Tally], None] | None = None,
    timeout: float = 10.0,
) -> Tally:
    """Send the incident to ``url`` for ``duration`` seconds (or ``max_requests``, or until
    ``stop`` is set) and return what was sent and answered.

    A request whose connection fails is retried once on a new connection and otherwise
    counted in ``failed_connections``, never in ``responses``. With ``deploy_url``,
    ``fra``'s requests go there from :data:`DEPLOY_AT` of the run on. With ``tenants``,
    requests name their customer and one customer fails (see the module's docstring).
    """
    addresses = {"main": _address(url)}
    if deploy_url is not None:
        addresses["deploy"] = _address(deploy_url)
    tally = Tally()
    per_location: Counter[str] = Counter()
    mutated = False
    connections: dict[str, http.client.HTTPConnection] = {}
    started = time.monotonic()
    try:
        for index in range(max_requests):
            elapsed = time.monotonic() - started
            if elapsed >= duration or (stop is not None and stop.is_set()):
                break
            location = _ROTATION[index % len(_ROTATION)]
            kind, path = next_request(location, per_location[location], elapsed / duration, mutated)
            count = per_location[location]
            per_location[location] += 1
            headers = {LOCATION_HEADER: location}
            if tenants:
                tenant = tenant_of(location, count)
                headers[TENANT_HEADER] = tenant
                kind, path = tenant_request(tenant, count, elapsed / duration, kind, path)
            mutated = mutated or kind == "mutation"
            if location == DEPLOY_LOCATION and count % 5 in (1, 3):
                headers["authorization"] = DEMO_TOKEN
            target = "main"
            if "deploy" in addresses and location == DEPLOY_LOCATION:
                target = "deploy" if elapsed / duration >= DEPLOY_AT else "main"
            status = None
            for _attempt in range(2):
                connection = connections.get(target)
                if connection is None:
                    host, port = addresses[target]
                    connection = http.client.HTTPConnection(host, port, timeout=timeout)
                    connections[target] = connection
                try:
                    connection.request("GET", path, headers=headers)
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    connections.pop(target).close()
                    continue
                status = response.status
                if response.will_close or status >= 500:
                    # uvicorn closes the connection after an app's error without saying so.
                    connections.pop(target).close()
                break
            if status is None:
                tally.failed_connections += 1
                continue
            tally.responses[(location, status)] += 1
            tally.kinds[kind] += 1
            if on_response is not None:
                on_response(location, status, tally)
    finally:
        for connection in connections.values():
            connection.close()
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sentinel.example.traffic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the example app")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    parser.add_argument(
        "--tenants",
        action="store_true",
        help=f"name each request's customer in {TENANT_HEADER}; one customer fails",
    )
    parser.add_argument(
        "--deploy-url",
        metavar="URL",
        # argparse formats help with %: the percentage's own sign is doubled.
        help=f"send {DEPLOY_LOCATION}'s requests here from {DEPLOY_AT * 100:.0f}%% of each run on "
        "(the staging build the demo deploys)",
    )
    parser.add_argument(
        "--repeat", action="store_true", help="play the incident again and again (containers)"
    )
    args = parser.parse_args(argv)
    if not (math.isfinite(args.duration) and args.duration > 0):
        parser.error(f"--duration must be a number > 0: {args.duration!r}")
    for name in ("url", "deploy_url"):
        value = getattr(args, name)
        if value is not None:
            try:
                _address(value)
            except ValueError as error:
                parser.error(str(error))
    while True:
        tally = play(args.url, args.duration, deploy_url=args.deploy_url, tenants=args.tenants)
        print(
            json.dumps(
                {
                    "sent": tally.by_location(),
                    "kinds": dict(tally.kinds),
                    "failed_connections": tally.failed_connections,
                }
            ),
            flush=True,
        )
        if not args.repeat:
            return 0 if tally.total else 1
        if not tally.total:
            time.sleep(1.0)  # the app is not up yet


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
