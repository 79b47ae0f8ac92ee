"""The benchmarked app and the variants that instrument it.

Each variant is built in a process of its own (sentry-sdk and others patch frameworks
globally), so importing this module does nothing but define names: every builder imports what
it needs when called.
"""

from __future__ import annotations

import functools
import io
import itertools
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

BARE = "bare"
SENTINEL = "sentinel"
SENTINEL_NOWATCH = "sentinel-nowatch"
SENTINEL_TRACES = "sentinel+traces"
SENTINEL_TENANTS = "sentinel+tenants"
FLOOR = "floor"
STARLETTE_EXPORTER = "starlette-exporter"
INSTRUMENTATOR = "instrumentator"
OTEL = "otel-asgi"
SENTRY_ERRORS = "sentry-errors"
SENTRY_TRACING = "sentry-tracing"

VARIANTS: tuple[str, ...] = (
    BARE,
    SENTINEL,
    SENTINEL_NOWATCH,
    SENTINEL_TRACES,
    SENTINEL_TENANTS,
    FLOOR,
    STARLETTE_EXPORTER,
    INSTRUMENTATOR,
    OTEL,
    SENTRY_ERRORS,
    SENTRY_TRACING,
)
# The variants compared with the peers (the `÷ peer` columns). sentinel-nowatch is neither:
# it is the reference that isolates what the default mutation watch costs (target (d));
# nor is floor, the least any middleware doing sentinel's per-request jobs costs.
SENTINEL_VARIANTS: tuple[str, ...] = (SENTINEL, SENTINEL_TRACES, SENTINEL_TENANTS)
PEERS: tuple[str, ...] = (STARLETTE_EXPORTER, INSTRUMENTATOR, OTEL, SENTRY_ERRORS, SENTRY_TRACING)

DESCRIPTIONS: dict[str, str] = {
    BARE: "FastAPI app, nothing added",
    SENTINEL: "sentinel.instrument(app), default config (traces off), metrics_port=0",
    SENTINEL_NOWATCH: 'the same with mutation_mode="off": no mutation watch (reference for (d))',
    SENTINEL_TRACES: "sentinel.instrument(app, span_exporter=discarding): tail-sampled traces",
    SENTINEL_TENANTS: 'the default with tenant_header="x-tenant": the tenant dimension on',
    FLOOR: "not a product: the least a middleware doing sentinel's per-request jobs costs",
    STARLETTE_EXPORTER: "starlette_exporter.PrometheusMiddleware, defaults",
    INSTRUMENTATOR: "prometheus_fastapi_instrumentator.Instrumentator().instrument(app)",
    OTEL: "opentelemetry-instrumentation-asgi OpenTelemetryMiddleware, SDK + BatchSpanProcessor",
    SENTRY_ERRORS: "sentry_sdk.init(traces_sample_rate=None), default integrations",
    SENTRY_TRACING: "sentry_sdk.init(traces_sample_rate=1.0), default integrations",
}

# Routes: name -> (method, path of request number i). The raising route's handler raises a
# new exception object of one type from one call site each time: the same bug repeating.
STATIC = "static"
PARAM = "param"
RAISE = "raise"
ROUTES: tuple[str, ...] = (STATIC, PARAM, RAISE)
ROUTE_TEMPLATES: dict[str, str] = {
    STATIC: "GET /static",
    PARAM: "GET /items/{item_id}",
    RAISE: "GET /boom",
}
EXPECTED_STATUS: dict[str, int] = {STATIC: 200, PARAM: 200, RAISE: 500}


# The tenant mix every variant gets (only sentinel+tenants reads it): one ``x-tenant`` header
# per request, customer ids (UUIDs) drawn Zipf-like (rank r has a share ~ 1/r) from a few
# thousand tenants with a fixed seed, so every worker sends the same tenant with request i.
TENANT_HEADER = "x-tenant"
TENANTS = 5_000
TENANT_SEED = 19
TENANT_SEQUENCE_LENGTH = 1 << 16  # cycled; a full run sends about 32,000 per worker


def tenant_sequence(
    tenants: int = TENANTS, length: int = TENANT_SEQUENCE_LENGTH, seed: int = TENANT_SEED
) -> list[bytes]:
    """The ``x-tenant`` values of requests 0, 1, ... (cycled), the same in every process."""
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode() for _ in range(tenants)]
    weights = list(itertools.accumulate(1.0 / rank for rank in range(1, tenants + 1)))
    return rng.choices(ids, cum_weights=weights, k=length)


def route_path(route: str, i: int) -> str:
    if route == STATIC:
        return "/static"
    if route == PARAM:
        return f"/items/{i}"
    return "/boom"


class BenchError(RuntimeError):
    """What the raising route raises."""


_boom_counter = itertools.count()


def make_fastapi_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/static")
    async def static() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/boom")
    async def boom() -> None:
        raise BenchError(f"boom number {next(_boom_counter)}")

    order = order_model()

    @app.get("/orders/{customer_id}", response_model=list[order])  # type: ignore[valid-type]
    async def orders(customer_id: int) -> Any:
        return customer_orders(order, customer_id)

    return app


ORDERS_PER_RESPONSE = 20


@functools.cache
def order_model() -> Any:
    """The work route's response item: an order with its lines, validated and serialised by
    FastAPI as a typical list endpoint's response is (the database left out). Built on first
    use, like every import of a framework here."""
    from pydantic import BaseModel

    class Line(BaseModel):
        sku: str
        quantity: int
        unit_price: float

    class Order(BaseModel):
        id: int
        customer_id: int
        status: str
        created: str
        lines: list[Line]
        total: float

    return Order


def customer_orders(order: Any, customer_id: int) -> list[Any]:
    """The work route's orders: :data:`ORDERS_PER_RESPONSE` orders of three lines each."""
    orders = []
    for number in range(ORDERS_PER_RESPONSE):
        lines = [
            {
                "sku": f"SKU-{(customer_id + number * 3 + k) % 997:04d}",
                "quantity": 1 + k,
                "unit_price": 9.5 + k,
            }
            for k in range(3)
        ]
        orders.append(
            order(
                id=customer_id * 1000 + number,
                customer_id=customer_id,
                status="shipped" if number % 3 else "open",
                created=f"2026-12-{1 + number % 28:02d}T10:00:00Z",
                lines=lines,
                total=sum(line["quantity"] * line["unit_price"] for line in lines),
            )
        )
    return orders


class NullStream(io.TextIOBase):
    """A text stream that discards what is written (sentinel's record stream)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


def _discarding_exporter() -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class DiscardingSpanExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    return DiscardingSpanExporter()


def _discarding_tracer_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_discarding_exporter()))
    return provider


def _init_sentry(traces_sample_rate: float | None) -> None:
    import sentry_sdk
    from sentry_sdk.transport import Transport

    class DiscardingTransport(Transport):
        def capture_envelope(self, envelope: Any) -> None:
            pass

        def flush(self, timeout: float, callback: Any = None) -> None:
            pass

        def kill(self) -> None:
            pass

    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=DiscardingTransport,
        traces_sample_rate=traces_sample_rate,
    )


def _bare() -> Any:
    return make_fastapi_app()


def _sentinel(traces: bool, watch: bool = True, tenants: bool = False) -> Callable[[], Any]:
    def build() -> Any:
        from prometheus_client import CollectorRegistry

        import sentinel

        kwargs: dict[str, Any] = {}
        if not watch:
            kwargs["mutation_mode"] = "off"
        if tenants:
            kwargs["tenant_header"] = TENANT_HEADER
        if traces:
            # sentinel's own pipeline: spans wait for the request's tail decision, kept
            # ones go through a bounded batch processor to this exporter.
            kwargs["span_exporter"] = _discarding_exporter()
        return sentinel.instrument(
            make_fastapi_app(),
            metrics_port=0,
            registry=CollectorRegistry(),
            stream=NullStream(),
            **kwargs,
        )

    return build


class FloorMiddleware:
    """The floor of sentinel's request path, for the benchmark only: per request, what any
    middleware doing sentinel's jobs must do at the least (a request object, the request in a
    context variable for reports made while it is served, the set of requests in flight for
    mutation suspects, ``send`` wrapped for the status, the finished request queued in a
    batch of 64, having let go of the scope), and nothing else: nothing is counted, sampled,
    probed or reported."""

    def __init__(self, app: Any) -> None:
        import contextvars

        self.app = app
        self.current: contextvars.ContextVar[Any] = contextvars.ContextVar("floor", default=None)
        self.in_flight: set[Any] = set()
        self.batch: list[tuple[Any, Any, float]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _FloorRequest(scope, send)
        token = self.current.set(request)
        self.in_flight.add(request)
        try:
            await self.app(scope, receive, request.send_wrapper)
        finally:
            self.current.reset(token)
            self.in_flight.discard(request)
            request.scope = request.send = None  # let go of the server's objects, as sentinel does
            batch = self.batch
            batch.append((request, request.status, time.perf_counter()))
            if len(batch) >= 64:
                batch.clear()


class _FloorRequest:
    __slots__ = ("body_complete", "method", "path", "scope", "send", "start", "started", "status")

    def __init__(self, scope: Any, send: Any) -> None:
        self.scope, self.send, self.start = scope, send, time.perf_counter()
        self.path, self.method = scope.get("path", ""), scope.get("method", "GET")
        self.status, self.started, self.body_complete = None, False, False

    def send_wrapper(self, message: Any) -> Any:
        message_type = message["type"]
        if message_type == "http.response.start":
            if not self.started:
                self.started, self.status = True, message.get("status")
        elif message_type == "http.response.body" and not message.get("more_body", False):
            self.body_complete = True
        return self.send(message)


def _floor() -> Any:
    return FloorMiddleware(make_fastapi_app())


def _starlette_exporter() -> Any:
    from starlette_exporter import PrometheusMiddleware

    app = make_fastapi_app()
    app.add_middleware(PrometheusMiddleware)
    return app


def _instrumentator() -> Any:
    from prometheus_fastapi_instrumentator import Instrumentator

    app = make_fastapi_app()
    Instrumentator().instrument(app)
    return app


def _otel() -> Any:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(
        make_fastapi_app(), tracer_provider=_discarding_tracer_provider()
    )


def _sentry(traces_sample_rate: float | None) -> Callable[[], Any]:
    def build() -> Any:
        _init_sentry(traces_sample_rate)  # before the app, as sentry's docs say
        return make_fastapi_app()

    return build


BUILDERS: dict[str, Callable[[], Any]] = {
    BARE: _bare,
    SENTINEL: _sentinel(traces=False),
    SENTINEL_NOWATCH: _sentinel(traces=False, watch=False),
    SENTINEL_TRACES: _sentinel(traces=True),
    SENTINEL_TENANTS: _sentinel(traces=False, tenants=True),
    FLOOR: _floor,
    STARLETTE_EXPORTER: _starlette_exporter,
    INSTRUMENTATOR: _instrumentator,
    OTEL: _otel,
    SENTRY_ERRORS: _sentry(None),
    SENTRY_TRACING: _sentry(1.0),
}


def build_app(variant: str) -> Any:
    """The ASGI app of ``variant``; call once per process."""
    return BUILDERS[variant]()
