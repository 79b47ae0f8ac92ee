"""Route templates: which declared route a request matched, never the raw path."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from starlette.routing import Host, Match, Route, WebSocketRoute

from .types import Scope

UNMATCHED_ROUTE = "<unmatched>"
"""The one route value shared by every request that no route matched."""

_CACHE_LIMIT = 4096


def find_router(app: Any, depth: int = 32) -> Any | None:
    """The Starlette router inside ``app``: looks through ``.router`` and middleware ``.app``."""
    seen: set[int] = set()
    for _ in range(depth):
        if app is None or id(app) in seen:
            return None
        seen.add(id(app))
        if hasattr(app, "routes") and hasattr(app, "lifespan_context"):
            return app
        router = getattr(app, "router", None)
        if router is not None and hasattr(router, "routes"):
            return router
        app = getattr(app, "app", None)
    return None


class RouteResolver:
    """Finds the template of the route a request matches, by asking the routes themselves.

    Plain routes are matched with their compiled path pattern (no child scope is built);
    mounts and other route types are asked through ``matches()``. Only static templates
    are cached, so the cache is bounded by the app's routes, never by request paths.
    """

    def __init__(self, app: Any, custom: Callable[[Scope], str | None] | None = None) -> None:
        self._app = app
        self._custom = custom
        self._router: Any | None = None
        self._router_searched = False
        self._cache: dict[tuple[str, str, str, str], str] = {}
        self._plain: list[PlainRoute] | None = None
        self._alternations: dict[tuple[Any, Any], _Alternation] = {}
        self.lazy_resolve: Callable[[Scope], str] | None = None
        """:meth:`resolve`, once a scope can be resolved after the app has handled it: once
        the app is known to route with top-level plain routes only, which leave the scope's
        path alone (mounts rewrite it, so those scopes are resolved up front); else None."""
        # id of each plain route -> its template; the routes are kept alive in _kept, so an
        # id found here is the route's, never another object's that reused it.
        self._by_route: dict[int, str] = {}
        self._kept: list[Any] = []
        self._routes_read: tuple[int, int, int] | None = None
        """The router's routes when they were read (:func:`_routes_read`)."""
        self._hosts = False
        """Whether a Host route is among them (its match depends on the Host header)."""

    @property
    def lazy(self) -> bool:
        """Whether a scope can be resolved after the app has handled it."""
        return self.lazy_resolve is not None

    def resolve(self, scope: Scope) -> str:
        # After routing, Starlette (1.x) and FastAPI record the matched route in the scope:
        # when it is one of the app's own top-level plain routes, that is the answer (only
        # those are known here, and none when a route_template decides).
        matched = scope.get("route")
        if matched is not None:
            template = self._by_route.get(id(matched))
            if template is not None:
                return template
        if self._custom is not None:
            return self._custom(scope) or UNMATCHED_ROUTE
        if self._plain is not None:
            # The common case, kept tight: one dict lookup and one C regex match.
            alternation = self._alternations.get((scope["type"], scope.get("method")))
            if alternation is not None:
                path = scope["path"]
                root_path = scope.get("root_path")
                if root_path and path.startswith(root_path):
                    path = path[len(root_path) :]
                template = alternation.first(path)
                if template is not None:
                    return template
        key = (
            scope["type"],
            scope.get("method", ""),
            scope.get("path", ""),
            scope.get("root_path", ""),
        )
        route = self._cache.get(key)
        if route is None:
            route = self._match(scope)
            if (
                "{" not in route
                and route != UNMATCHED_ROUTE
                and not self._hosts  # the host decides too, and is not in the key
                and len(self._cache) < _CACHE_LIMIT
            ):
                self._cache[key] = route
        return route

    def _match(self, scope: Scope) -> str:
        route = self._match_known(scope)
        # Routes added since they were read (add_route, include_router after the first
        # request): read them again. Only unmatched requests look, at the cost of a length
        # and two identities.
        if (
            route == UNMATCHED_ROUTE
            and self._router is not None
            and self._routes_read != _routes_read(self._router)
        ):
            self._forget_routes()
            route = self._match_known(scope)
        return route

    def _forget_routes(self) -> None:
        self._router_searched = False
        self._plain = None
        self._alternations = {}
        self._by_route = {}
        self._kept = []
        self._cache.clear()
        self.lazy_resolve = None

    def _match_known(self, scope: Scope) -> str:
        if not self._router_searched:
            self._router = find_router(self._app)
            self._router_searched = True
            self._routes_read = _routes_read(self._router)
            self._plain = _plain_routes(self._router)
            self._hosts = self._router is not None and _has_host(self._router.routes)
            # A route_template, when given, decides every route: never lazy.
            if self._plain is not None and self._router is not None and self._custom is None:
                self._kept = [
                    route
                    for route in _expanded(self._router.routes)
                    if isinstance(route, (Route, WebSocketRoute))
                ]
                self._by_route = {id(route): str(route.path) for route in self._kept}
                self.lazy_resolve = self.resolve
        if self._router is None:
            return UNMATCHED_ROUTE
        if self._plain is not None:
            # Every route is a plain Route/WebSocketRoute at the top level: one combined
            # pattern per method finds the first route that fully matches, in C.
            http = scope["type"] == "http"
            method = scope.get("method", "GET") if http else "WEBSOCKET"
            path = _route_path(scope)
            combined = self._combined(http, method)
            if method in _KNOWN_METHODS:
                self._alternations[(scope["type"], scope.get("method"))] = combined
            template = combined.first(path)
            if template is None:  # a path that matches with another method only: 405
                template = self._combined(http, None).first(path)
            return template or UNMATCHED_ROUTE
        probe = {
            "type": scope["type"],
            "path": scope.get("path", ""),
            "root_path": scope.get("root_path", ""),
            "method": scope.get("method", "GET"),
            "headers": scope.get("headers") or [],  # a Host route matches on the host
            "path_params": {},
        }
        return _match_routes(self._router.routes, probe, "") or UNMATCHED_ROUTE

    def _combined(self, http: bool, method: str | None) -> _Alternation:
        if method is not None and method not in _KNOWN_METHODS:
            method = "OTHER"  # raw methods are unbounded; the pattern cache must not be
        key = (http, method)
        combined = self._alternations.get(key)
        if combined is None:
            assert self._plain is not None
            combined = _Alternation(
                [
                    (regex, template)
                    for is_http, regex, methods, template in self._plain
                    if is_http is http and (method is None or methods is None or method in methods)
                ]
            )
            self._alternations[key] = combined
        return combined


_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "WEBSOCKET"}
)
# Any group inside a route's pattern: named parameters, and capturing groups that
# convertors use (the float convertor has one). Each becomes non-capturing.
_INNER_GROUP = re.compile(r"(?<!\\)\((?:\?P<[^>]+>|(?!\?))")


class _Alternation:
    """Several route patterns as one regex; ``first`` gives the first that matches."""

    def __init__(self, routes: list[tuple[re.Pattern[str], str]]) -> None:
        self._templates = [template for _, template in routes]
        parts = []
        for regex, _ in routes:
            # Starlette's patterns are anchored and name their parameters; names would
            # clash between alternatives, so they become non-capturing, and each route is
            # one capturing group: lastindex says which route matched.
            body = _INNER_GROUP.sub("(?:", regex.pattern.removeprefix("^").removesuffix("$"))
            parts.append(f"({body})")
        self._regex = re.compile("^(?:" + "|".join(parts) + ")$") if parts else None

    def first(self, path: str) -> str | None:
        match = self._regex.match(path) if self._regex is not None else None
        if match is None:
            return None
        return self._templates[match.lastindex - 1] if match.lastindex else None


PlainRoute = tuple[bool, "re.Pattern[str]", "frozenset[str] | set[str] | None", str]


def _plain_routes(router: Any) -> list[PlainRoute] | None:
    """The router's routes as (is_http, regex, methods, template) when all are plain."""
    if router is None:
        return None
    plain: list[PlainRoute] = []
    for route in _expanded(router.routes):
        if isinstance(route, (Route, WebSocketRoute)):
            plain.append(
                (
                    isinstance(route, Route),
                    route.path_regex,
                    getattr(route, "methods", None),
                    str(route.path),
                )
            )
        elif isinstance(getattr(route, "original_route", None), Route):
            # FastAPI's route under an inclusion's prefix: it matches the full path with
            # the route's own methods, as a plain route does (http only).
            plain.append((True, route.path_regex, route.methods or None, str(route.path)))
        else:
            return None  # mounts and custom routes are asked through matches()
    return plain


def _routes_read(router: Any) -> tuple[int, int, int] | None:
    """What tells the router's routes changed: their count and the first and last route
    (not the list's identity: a router may build a new list each time it is asked)."""
    routes = getattr(router, "routes", None)
    try:
        return (len(routes), id(routes[0]), id(routes[-1])) if routes else (0, 0, 0)
    except (TypeError, IndexError, KeyError):
        return None


def _has_host(routes: Any, depth: int = 8) -> bool:
    """Whether a Host route is among ``routes`` or the routes they mount."""
    if depth == 0:
        return False
    for route in routes:
        if isinstance(route, Host):
            return True
        inner = getattr(route, "routes", None)
        if inner and _has_host(inner, depth - 1):
            return True
    return False


def _route_path(scope: Mapping[str, Any]) -> str:
    # What Starlette matches against: the path below the mount point (root_path).
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :]
    return path


def _expanded(routes: Any) -> Iterator[Any]:
    """``routes``, with each router FastAPI includes lazily (a route with no path of its own,
    matching its routes under the inclusion's prefix) replaced by those routes as it matches
    them: their paths are the full ones, prefixes included."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if candidates is None or hasattr(route, "path"):
            yield route
            continue
        for candidate in candidates():
            if hasattr(candidate, "effective_candidates"):
                yield from _expanded([candidate])
            else:
                # A plain Starlette route (or mount) rebuilt under the prefix, or FastAPI's
                # own route's context, which carries the full path and matches as it would.
                yield getattr(candidate, "starlette_route", None) or candidate


def _match_routes(routes: Any, scope: dict[str, Any], prefix: str) -> str | None:
    partial: str | None = None
    route_path = _route_path(scope)
    for route in _expanded(routes):
        if isinstance(route, (Route, WebSocketRoute)):
            if (scope["type"] == "http") != isinstance(route, Route):
                continue
            if route.path_regex.match(route_path) is None:
                continue
            methods = getattr(route, "methods", None)
            if methods is None or scope["method"] in methods:
                return prefix + str(route.path)
            if partial is None:
                partial = prefix + str(route.path)
            continue
        try:
            match, child = route.matches(scope)
        except Exception:
            continue
        if match == Match.NONE:
            continue
        template = getattr(route, "path", None)
        if template is None:
            if not isinstance(route, Host):
                continue
            template = ""  # the host picks the routes; the template is their path
        sub_routes = getattr(route, "routes", None)
        if sub_routes and match == Match.FULL and not hasattr(route, "endpoint"):
            inner = _match_routes(sub_routes, {**scope, **child}, prefix + str(template))
            if inner is not None:
                return inner
            if isinstance(route, Host):
                return UNMATCHED_ROUTE  # the host's router answers: none of its routes
            return prefix + str(template) + "/{path:path}"
        if match == Match.FULL:
            return prefix + str(template)
        if partial is None:
            partial = prefix + str(template)
    return partial
