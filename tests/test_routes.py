"""Route templates are found by asking the router, and never leak the raw path."""

from __future__ import annotations

from helpers import record_calls
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, Router, WebSocketRoute

from sentinel._routes import UNMATCHED_ROUTE, RouteResolver, find_router


async def endpoint(request: object) -> PlainTextResponse:
    return PlainTextResponse("")


async def ws(websocket: object) -> None:
    return None


def scope(path: str, method: str = "GET", kind: str = "http") -> dict[str, object]:
    return {"type": kind, "path": path, "method": method, "root_path": "", "headers": []}


APP = Starlette(
    routes=[
        Route("/items/{item_id:int}", endpoint),
        Route("/only-post", endpoint, methods=["POST"]),
        Mount("/api", routes=[Route("/users/{name}", endpoint)]),
        WebSocketRoute("/ws/{room}", ws),
    ],
    middleware=[Middleware(GZipMiddleware)],
)


def test_templates_for_matched_routes() -> None:
    """Path parameters, mounts and websocket routes resolve to their declared templates."""
    resolver = RouteResolver(APP)
    assert resolver.resolve(scope("/items/12")) == "/items/{item_id:int}"
    assert resolver.resolve(scope("/api/users/alice")) == "/api/users/{name}"
    assert resolver.resolve(scope("/ws/lobby", kind="websocket")) == "/ws/{room}"


def test_method_mismatch_keeps_the_template_and_misses_share_one_value() -> None:
    """A 405 is still its route; every unmatched path is the one unmatched value."""
    resolver = RouteResolver(APP)
    assert resolver.resolve(scope("/only-post", method="GET")) == "/only-post"
    assert resolver.resolve(scope("/items/not-an-int")) == UNMATCHED_ROUTE
    assert resolver.resolve(scope("/nothing/here")) == UNMATCHED_ROUTE


def test_router_is_found_through_middleware_and_wrappers() -> None:
    """find_router looks through .router and middleware .app chains."""
    assert find_router(APP) is APP.router
    assert find_router(APP.build_middleware_stack()) is APP.router
    bare = Router(routes=[Route("/x", endpoint)])
    assert find_router(bare) is bare
    assert find_router(object()) is None


def test_cache_is_bounded_under_random_paths() -> None:
    """Random paths cost lookups, not memory."""
    resolver = RouteResolver(APP)
    for index in range(20_000):
        resolver.resolve(scope(f"/random/{index}"))
    assert len(resolver._cache) <= 4096


def test_convertor_groups_do_not_confuse_the_combined_pattern() -> None:
    """A float parameter (its pattern has a group of its own) and later routes resolve right."""
    app = Starlette(
        routes=[
            Route("/price/{amount:float}", endpoint),
            Route("/price/{amount:float}/tax", endpoint),
            Route("/items", endpoint, methods=["GET"]),
            Route("/items", endpoint, methods=["POST"]),
        ]
    )
    resolver = RouteResolver(app)
    assert resolver.resolve(scope("/price/1.5")) == "/price/{amount:float}"
    assert resolver.resolve(scope("/price/1.5/tax")) == "/price/{amount:float}/tax"
    assert resolver.resolve(scope("/price/2/tax")) == "/price/{amount:float}/tax"
    assert resolver.resolve(scope("/items", method="POST")) == "/items"
    assert resolver.resolve(scope("/items", method="DELETE")) == "/items"  # 405
    assert resolver.resolve(scope("/items", method="BREW")) == "/items"
    assert resolver.resolve(scope("/nope", method="BREW")) == UNMATCHED_ROUTE


def test_the_routers_recorded_match_is_used_after_routing() -> None:
    """Once the router has put its match in the scope, the template comes from there."""
    first, second = Route("/a/{x}", endpoint), Route("/b/{y}", endpoint)
    resolver = RouteResolver(Starlette(routes=[first, second]))
    assert resolver.resolve(scope("/a/1")) == "/a/{x}"  # the first request finds the router
    assert resolver.lazy
    # The recorded route wins over the path (the router matched it, with whatever state it
    # had); a route object that is not one of the app's own is ignored.
    assert resolver.resolve({**scope("/a/1"), "route": second}) == "/b/{y}"
    stranger = Route("/a/{x}", endpoint)
    assert resolver.resolve({**scope("/zzz"), "route": stranger}) == UNMATCHED_ROUTE
    assert resolver.resolve({**scope("/a/2"), "route": "not a route"}) == "/a/{x}"


def test_apps_with_mounts_are_resolved_up_front() -> None:
    """Mounts rewrite root_path while routing, so those scopes cannot wait until the end."""
    resolver = RouteResolver(APP)
    resolver.resolve(scope("/items/1"))
    assert not resolver.lazy
    assert not RouteResolver(APP, lambda scope: "/custom").lazy


PLAIN = Starlette(routes=[Route("/items/{item_id:int}", endpoint), Route("/static", endpoint)])


def test_the_route_the_router_matched_is_its_template_and_a_route_template_still_decides() -> None:
    """After routing, the matched route in the scope gives the template at once, whatever the
    path; with a route_template given, that callable decides every route, matched or not."""
    resolver = RouteResolver(PLAIN)
    assert resolver.resolve(scope("/items/3")) == "/items/{item_id:int}"  # learns the routes
    assert resolver.lazy
    matched = {**scope("/elsewhere"), "route": PLAIN.router.routes[1]}
    assert resolver.resolve(matched) == "/static"
    stranger = {**scope("/items/4"), "route": Route("/static", endpoint)}  # not the app's
    assert resolver.resolve(stranger) == "/items/{item_id:int}"

    custom = RouteResolver(PLAIN, lambda s: f"custom {s['path']}")
    assert custom.resolve(scope("/items/3")) == "custom /items/3"
    assert not custom.lazy
    assert custom.resolve(matched) == "custom /elsewhere"


def test_routes_fastapi_includes_lazily_are_their_full_templates() -> None:
    """FastAPI keeps an included router as one lazy route (no path of its own) and matches
    its routes under the inclusion's prefix: each resolves to its full template, nested
    inclusions, websockets, plain Starlette routes and mounts inside them too, a 405 and a
    422 keep their route, and what no route matches is the unmatched value."""
    from fastapi import APIRouter, FastAPI, WebSocket

    users = APIRouter(prefix="/users")

    @users.get("/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"user_id": user_id}

    @users.post("/admin/reset")
    async def reset() -> None:
        return None

    @users.websocket("/live/{channel}")
    async def live(websocket: WebSocket, channel: str) -> None:
        return None

    items = APIRouter()

    @items.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    items.add_route("/plain/{name}", endpoint)
    items.mount("/static", Router(routes=[Route("/{file}", endpoint)]))
    users.include_router(items, prefix="/nested")
    app = FastAPI()
    app.include_router(users, prefix="/v1")
    app.include_router(users, prefix="/v2")

    resolver = RouteResolver(app)
    assert resolver.resolve(scope("/v1/users/7")) == "/v1/users/{user_id}"
    assert resolver.resolve(scope("/v2/users/7")) == "/v2/users/{user_id}"
    assert resolver.resolve(scope("/v1/users/not-an-int")) == "/v1/users/{user_id}"  # 422
    assert resolver.resolve(scope("/v1/users/admin/reset", method="GET")) == (
        "/v1/users/admin/reset"
    )  # 405
    assert resolver.resolve(scope("/v1/users/nested/items/3")) == (
        "/v1/users/nested/items/{item_id}"
    )
    if any(not hasattr(route, "path") for route in app.router.routes):
        # Included lazily (FastAPI 0.16x). Earlier versions copy the routes when including,
        # which drops the mount and the outer prefix of a plain route: routed as copied.
        assert resolver.resolve(scope("/v1/users/nested/plain/x")) == (
            "/v1/users/nested/plain/{name}"
        )
        assert resolver.resolve(scope("/v2/users/nested/static/a.css")) == (
            "/v2/users/nested/static/{file}"
        )
    assert resolver.resolve(scope("/v1/users/live/news", kind="websocket")) == (
        "/v1/users/live/{channel}"
    )
    assert resolver.resolve(scope("/v3/users/7")) == UNMATCHED_ROUTE


def test_requests_to_included_routes_are_counted_under_their_full_templates() -> None:
    """Through the middleware, after FastAPI has routed the request (the route is read at
    the end, from what the router left in the scope)."""
    from fastapi import APIRouter, FastAPI

    import sentinel
    from sentinel import testing

    router = APIRouter(prefix="/orders")

    @router.get("/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        return {"order_id": order_id}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    with testing.capture_reports() as captured:
        client = testing.Client(sentinel.instrument(app, sentinel=captured.sentinel))
        assert client.get("/v1/orders/12").status_code == 200
        assert client.get("/v1/orders/twelve").status_code == 422
        assert client.get("/v1/nothing").status_code == 404
        captured.flush()
        count = captured.metric
        assert count("sentinel_http_requests_total", route="/v1/orders/{order_id}") == 2
        assert count("sentinel_http_requests_total", route=UNMATCHED_ROUTE) == 1


def test_routes_added_after_the_first_request_are_their_templates() -> None:
    """A route added once the app serves (add_route, include_router, a mount appended) is
    its template, not ``<unmatched>``: an unmatched request reads the routes again when
    they changed."""
    app = Starlette(routes=[Route("/first", endpoint)])
    resolver = RouteResolver(app)
    assert resolver.resolve(scope("/first")) == "/first"
    assert resolver.resolve(scope("/late/7")) == UNMATCHED_ROUTE
    app.add_route("/late/{y}", endpoint)
    assert resolver.resolve(scope("/late/7")) == "/late/{y}"
    app.router.routes.append(Mount("/m", routes=[Route("/{z}", endpoint)]))
    assert resolver.resolve(scope("/m/3")) == "/m/{z}"
    assert resolver.resolve(scope("/first")) == "/first"
    assert resolver.resolve(scope("/nothing")) == UNMATCHED_ROUTE


def test_requests_to_routes_included_late_are_counted_under_their_templates() -> None:
    """Through the middleware: FastAPI's include_router after the first request."""
    from fastapi import APIRouter, FastAPI

    import sentinel
    from sentinel import testing

    app = FastAPI()

    @app.get("/health")
    async def health() -> str:
        return "ok"

    plugin = APIRouter(prefix="/plugin")

    @plugin.get("/items/{item_id}")
    async def item(item_id: int) -> int:
        return item_id

    with testing.capture_reports() as captured:
        client = testing.Client(sentinel.instrument(app, sentinel=captured.sentinel))
        assert client.get("/health").status_code == 200
        app.include_router(plugin)
        assert client.get("/plugin/items/3").status_code == 200
        captured.flush()
        count = captured.metric
        assert count("sentinel_http_requests_total", route="/plugin/items/{item_id}") == 1
        assert count("sentinel_http_requests_total", route=UNMATCHED_ROUTE) == 0


def test_host_routes_are_the_templates_of_the_routes_they_hold() -> None:
    """A Host route picks routes by the Host header; the request is counted under the path
    template of the route it reached, and two hosts with different routes are told apart
    (nothing cached under a path alone)."""
    from starlette.routing import Host

    app = Starlette(
        routes=[
            Host("{tenant}.example.com", Router(routes=[Route("/orders/{oid}", endpoint)])),
            Host("admin.example.org", Router(routes=[Route("/users", endpoint)])),
        ]
    )

    def on(host: str, path: str) -> dict[str, object]:
        return {**scope(path), "headers": [(b"host", host.encode())]}

    resolver = RouteResolver(app)
    assert resolver.resolve(on("acme.example.com", "/orders/7")) == "/orders/{oid}"
    assert resolver.resolve(on("admin.example.org", "/users")) == "/users"
    assert resolver.resolve(on("acme.example.com", "/users")) == UNMATCHED_ROUTE
    assert resolver.resolve(on("nobody.example.net", "/orders/7")) == UNMATCHED_ROUTE


def test_a_router_that_builds_its_route_list_each_time_is_read_once() -> None:
    """A router whose ``routes`` is a property building a new list on each read: unmatched
    requests do not take it for changed routes (and read them all again) each time."""

    class Rebuilding(Router):
        @property  # type: ignore[override]
        def routes(self) -> list[Route]:
            return list(self._fixed)

        @routes.setter
        def routes(self, value: list[Route]) -> None:
            self._fixed = list(value)

    router = Rebuilding(routes=[Route(f"/r{number}/{{x}}", endpoint) for number in range(50)])
    resolver = RouteResolver(router)
    reads = record_calls(resolver, "_forget_routes")
    for number in range(200):
        assert resolver.resolve(scope(f"/nothing/{number}")) == UNMATCHED_ROUTE
    assert resolver.resolve(scope("/r7/1")) == "/r7/{x}"
    assert len(reads) == 0
