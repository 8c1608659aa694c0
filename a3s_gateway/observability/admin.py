# -*- test-case-name: tests.test_admin -*-
"""
The admin API and the dashboard page, served on the entrypoint named by C{dashboard { }}.

For the gateway (which mounts them) and for operators (who read them):

- L{AdminResource}: a twisted.web leaf resource answering C{/api/gateway/...} (the reference's
  dashboard API, spec 1.18, plus C{/stats}), C{/metrics}, C{/ping} and C{/dashboard/} (the
  static page shipped in C{a3s_gateway/dashboard/}). L{AdminResource.handles} tells the
  entrypoint which request paths belong here; every other path goes to the proxy.
- L{TrafficStats}: the live traffic behind the page's charts and each backend's recent error
  rate. A site observer (L{TrafficStats.request_finished}) does a few integer updates per
  request; a C{LoopingCall} closes one sample per second, and the last five minutes are kept.
- L{redacted_config}: the configuration as JSON-ready data, secrets masked.
"""

from __future__ import annotations

import json
import math
import weakref
from bisect import bisect_left
from collections import deque
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple
from urllib.parse import unquote_to_bytes

import attr
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

import a3s_gateway
from a3s_gateway.config.load import MIDDLEWARE_OPTIONS
from a3s_gateway.config.schema import GatewayConfig, MiddlewareConfig
from a3s_gateway.router.table import Route
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.registry import Service as GatewayService

if TYPE_CHECKING:
    from a3s_gateway.gateway import Gateway
    from a3s_gateway.proxy.site import GatewayRequest

log = Logger()

API_PREFIX = b"/api/gateway"
REDACTED = "***"
"""What a secret reads as in the admin API."""

STATS_WINDOW_SECS = 300
"""How far back C{/api/gateway/stats} reaches: one sample per second."""
ERROR_RATE_WINDOW_SECS = 60
"""The window of each backend's C{recent_error_rate}."""

STRATEGY_NAMES = {
    "round-robin": "RoundRobin",
    "weighted": "Weighted",
    "least-connections": "LeastConnections",
    "random": "Random",
}
"""The reference's JSON names of the load-balancing strategies."""

# Latency histogram bucket bounds in seconds: 0.1 ms to 300 s, 15 % apart, so a percentile is
# exact to within 15 % and never above the slowest request of its second (see _percentile).
_LATENCY_BOUNDS: Tuple[float, ...] = tuple(
    0.0001 * 1.15**i for i in range(int(math.log(300 / 0.0001, 1.15)) + 2)
)

# Middleware options holding a secret, masked by key. The JWT HMAC secret is "value".
_SECRET_OPTIONS = frozenset({"keys", "password", "value"})
# Header-map entries (headers middleware) whose values are credentials, by name.
_SECRET_HEADER_WORDS = ("auth", "cookie", "token", "secret", "key", "password", "session")

_JSON = b"application/json"
_STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
}
# The page loads only its own files and talks only to this origin.
_PAGE_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_EXACT_PATHS = frozenset(
    {b"/ping", b"/ping/", b"/metrics", b"/metrics/", b"/dashboard", API_PREFIX}
)


def redact_url(url: str) -> str:
    """
    C{url} with the password of its user information masked (C{redis://:s3cret@h} gives
    C{redis://:***@h}); user information without a C{:} is masked whole, since it is often a
    token (C{https://TOKEN@host}). Anything that is not an URL with user information is returned
    unchanged.
    """
    scheme_end = url.find("://")
    if scheme_end <= 0:
        return url
    start = scheme_end + 3
    end = len(url)
    for delimiter in "/?#":
        found = url.find(delimiter, start)
        if found != -1:
            end = min(end, found)
    at = url.rfind("@", start, end)
    if at == -1:
        return url
    colon = url.find(":", start, at)
    if colon == -1:
        return url[:start] + REDACTED + url[at:]
    return url[: colon + 1] + REDACTED + url[at:]


def _redact_urls(value: Any) -> Any:
    """Every string in C{value} (nested dicts and lists) passed through L{redact_url}."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {key: _redact_urls(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_urls(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """C{value} with tuples as lists and mappings as dicts, all the way down, for JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _secret_header(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_HEADER_WORDS)


def _middleware_json(middleware: MiddlewareConfig) -> Dict[str, Any]:
    """
    A middleware as the reference writes it: C{name}, C{type} and every option key, C{null} when
    not set, with secrets masked.
    """
    data: Dict[str, Any] = {"name": middleware.name, "type": middleware.type}
    data.update({key: None for key, _ in MIDDLEWARE_OPTIONS})
    for key, option in middleware.options.items():
        option = _plain(option)
        if option is None:
            data[key] = None
        elif key in _SECRET_OPTIONS:
            data[key] = [REDACTED for _ in option] if isinstance(option, list) else REDACTED
        elif key in ("request_headers", "response_headers") and isinstance(option, dict):
            data[key] = {
                name: REDACTED if _secret_header(name) else text for name, text in option.items()
            }
        else:
            data[key] = option
    return data


def redacted_config(config: GatewayConfig) -> Dict[str, Any]:
    """
    The whole configuration as JSON-ready data (C{attr.asdict} of the schema), as
    C{/api/gateway/config} serves it.

    Every field is present, C{null}, C{[]} or C{{}} when unset; durations are seconds; the
    rollout's C{from_} is written C{from}; middlewares are the reference's flat bag with C{type}.
    Secrets are masked: the middleware options C{keys}, C{password} and C{value} (JWT secret),
    credential-like header values of the C{headers} middleware, and the password in the user
    information of every URL (C{redis_url}, backends, C{forward_auth_url}, ...). The loader has
    already expanded C{${VAR}}, hence masking by key. TLS file paths are not secrets. The
    C{source} file name is not configuration and is left out.
    """
    data: Dict[str, Any] = attr.asdict(
        config,
        retain_collection_types=False,
        filter=lambda attribute, _: attribute.name != "source",
    )
    data["middlewares"] = {
        name: _middleware_json(middleware) for name, middleware in config.middlewares.items()
    }
    for service in data["services"].values():
        rollout = service.get("rollout")
        if rollout is not None:
            service["rollout"] = {
                ("from" if key == "from_" else key): value for key, value in rollout.items()
            }
    redacted: Dict[str, Any] = _redact_urls(data)
    return redacted


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Sample:
    """
    One second of traffic.

    @ivar t: When the second ended (clock seconds).
    @ivar requests: Requests finished in it.
    @ivar errors: Those answered with a 5xx status.
    @ivar p50_ms: Median latency in milliseconds, or C{None} without requests.
    @ivar p99_ms: 99th percentile latency in milliseconds, or C{None} without requests.
    """

    t: float
    requests: int
    errors: int
    p50_ms: Optional[float]
    p99_ms: Optional[float]


def _percentile(histogram: List[int], count: int, fraction: float, highest: float) -> float:
    """
    The latency (seconds) below which C{fraction} of the C{count} requests of C{histogram} fall:
    the upper bound of the bucket holding that rank, never more than the C{highest} latency
    seen.
    """
    rank = max(1, math.ceil(fraction * count))
    seen = 0
    for index, bucket in enumerate(histogram):
        seen += bucket
        if seen >= rank:
            if index < len(_LATENCY_BOUNDS):
                return min(_LATENCY_BOUNDS[index], highest)
            break
    return highest


class TrafficStats(Service):
    """
    Request rate, error rate and latency over the last L{STATS_WINDOW_SECS} seconds, and each
    backend's error rate over the last L{ERROR_RATE_WINDOW_SECS}, for the dashboard.

    Fed by L{request_finished}, a C{GatewaySite} observer, and sampled once per second by a
    C{LoopingCall} on the injected clock while the service runs (a child of the L{Gateway}).
    Memory is bounded: one small histogram for the current second, L{STATS_WINDOW_SECS}
    samples, and per backend URL two counters per second of the error-rate window.

    An error is a response with a status of 500 or more (the gateway's own 502/503/504
    included). Requests answered by the L{AdminResource} itself are not traffic: it marks them
    with L{exclude}.

    @ivar total: Requests observed since construction (admin requests excluded).
    @ivar started_at: Clock seconds when the service started, or C{None} before.
    """

    def __init__(
        self,
        clock: IReactorTime,
        window_secs: int = STATS_WINDOW_SECS,
        error_window_secs: int = ERROR_RATE_WINDOW_SECS,
    ) -> None:
        self._clock = clock
        self.window_secs = window_secs
        self.total = 0
        self.started_at: Optional[float] = None
        self._samples: Deque[Sample] = deque(maxlen=window_secs)
        self._excluded: weakref.WeakSet[Request] = weakref.WeakSet()
        self._loop: Optional[LoopingCall] = None
        # The current second.
        self._requests = 0
        self._errors = 0
        self._highest = 0.0
        self._histogram = [0] * (len(_LATENCY_BOUNDS) + 1)
        self._backend_now: Dict[str, List[int]] = {}
        # The error-rate window: one {url: [requests, errors]} per past second, and their sums.
        self._backend_seconds: Deque[Dict[str, List[int]]] = deque(maxlen=error_window_secs)
        self._backend_totals: Dict[str, List[int]] = {}

    def startService(self) -> None:
        """Start sampling once per second."""
        Service.startService(self)
        self.started_at = self._clock.seconds()
        loop = LoopingCall(self._tick)
        loop.clock = self._clock
        loop.start(1.0, now=False)
        self._loop = loop

    def stopService(self) -> None:
        """Stop sampling; the samples taken stay readable."""
        Service.stopService(self)
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def exclude(self, request: Request) -> None:
        """Do not count C{request} as traffic (the admin API's own requests)."""
        self._excluded.add(request)

    def request_finished(self, request: GatewayRequest) -> None:
        """
        The site observer: count a finished (or aborted) request in the current second.
        """
        if request in self._excluded:
            return
        self.total += 1
        elapsed = self._clock.seconds() - request.started
        error = request.code >= 500
        self._requests += 1
        if error:
            self._errors += 1
        self._histogram[bisect_left(_LATENCY_BOUNDS, elapsed)] += 1
        if elapsed > self._highest:
            self._highest = elapsed
        url = request.backend_url
        if url is not None:
            counts = self._backend_now.get(url)
            if counts is None:
                counts = self._backend_now[url] = [0, 0]
            counts[0] += 1
            if error:
                counts[1] += 1

    def _tick(self) -> None:
        """Close the current second: one L{Sample}, and a second of the error-rate window."""
        count = self._requests
        p50: Optional[float] = None
        p99: Optional[float] = None
        if count:
            histogram, highest = self._histogram, self._highest
            p50 = round(_percentile(histogram, count, 0.5, highest) * 1000, 3)
            p99 = round(_percentile(histogram, count, 0.99, highest) * 1000, 3)
            self._histogram = [0] * len(histogram)
        self._samples.append(Sample(self._clock.seconds(), count, self._errors, p50, p99))
        self._requests = self._errors = 0
        self._highest = 0.0
        seconds, totals = self._backend_seconds, self._backend_totals
        if len(seconds) == seconds.maxlen:
            for url, (requests, errors) in seconds[0].items():
                total = totals[url]
                total[0] -= requests
                total[1] -= errors
                if not total[0]:
                    del totals[url]
        current, self._backend_now = self._backend_now, {}
        seconds.append(current)
        for url, (requests, errors) in current.items():
            total = totals.setdefault(url, [0, 0])
            total[0] += requests
            total[1] += errors

    def series(self) -> List[Dict[str, Any]]:
        """The samples, oldest first, as C{/api/gateway/stats} serves them."""
        return [
            {"t": round(s.t, 3), "requests": s.requests, "errors": s.errors,
             "p50_ms": s.p50_ms, "p99_ms": s.p99_ms}
            for s in self._samples
        ]  # fmt: skip

    def backend_errors(self, url: str) -> Tuple[int, Optional[float]]:
        """
        Requests a backend served in the error-rate window (the current second included) and
        the share of them that were errors, C{None} without requests.
        """
        requests = errors = 0
        for counts in (self._backend_totals.get(url), self._backend_now.get(url)):
            if counts is not None:
                requests += counts[0]
                errors += counts[1]
        return requests, (round(errors / requests, 4) if requests else None)


class AdminResource(Resource):
    """
    The admin API, C{/metrics}, C{/ping} and the dashboard page of one gateway.

    Every answer is GET/HEAD only (anything else is 405), JSON unless it is the metrics text,
    the liveness C{ok} or a page file, and never a traceback. Paths (with an optional trailing
    C{/} under C{/api/gateway}), names URL-decoded:

    - C{/api/gateway/health}, C{/metrics} and C{/api/gateway/metrics}, C{/api/gateway/config}
      (secrets masked), C{/routes}, C{/routes/<name>}, C{/services}, C{/services/<name>},
      C{/backends}, C{/version} (spec 1.18), C{/api/gateway/stats} (the page's charts).
    - C{/ping}: C{ok}, for liveness probes.
    - C{/dashboard} redirects to C{/dashboard/}, the page; C{/dashboard/<file>} its three files.

    @param gateway: The gateway shown (not necessarily started).
    @param metrics_exposition: Returns the Prometheus text and its content type, at scrape time.
    @param clock: For uptime and for the traffic samples.
    @param total_requests: Returns C{gateway_requests_total} for C{/health}; without it, the
        requests L{stats} has observed.
    @ivar gateway: The gateway shown; assign the new one on a reload (L{stats} stays).
    @ivar stats: The live traffic; the gateway adds it to its service tree and appends
        C{stats.request_finished} to every site's observers.
    """

    isLeaf = True

    def __init__(
        self,
        gateway: Gateway,
        metrics_exposition: Callable[[], Tuple[bytes, bytes]],
        clock: IReactorTime,
        total_requests: Optional[Callable[[], int]] = None,
    ) -> None:
        Resource.__init__(self)
        self.gateway = gateway
        self._metrics = metrics_exposition
        self._clock = clock
        self._total_requests = total_requests
        self.stats = TrafficStats(clock)
        dashboard = files(a3s_gateway) / "dashboard"
        # Three small files, read once: no file system access while serving.
        self._files = {name: (dashboard / name).read_bytes() for name in _STATIC}

    @staticmethod
    def handles(path: bytes) -> bool:
        """
        Whether a request path (raw, without its query) belongs to the admin resource: C{/ping},
        C{/metrics}, C{/dashboard}, and everything under C{/api/gateway/} and C{/dashboard/}.
        """
        return (
            path in _EXACT_PATHS
            or path.startswith(b"/api/gateway/")
            or path.startswith(b"/dashboard/")
        )

    def render(self, request: Request) -> bytes:
        """Answer C{request}; an unexpected error answers 500 JSON and is logged."""
        self.stats.exclude(request)
        try:
            return self._dispatch(request)
        except Exception:
            log.failure("Admin API request for {path!r} failed", path=request.path)
            return self._json(request, 500, {"error": "Internal server error"})

    def _dispatch(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._json(request, 405, {"error": "Method not allowed"})
        path = request.path
        if path in (b"/ping", b"/ping/"):
            return self._send(request, 200, b"text/plain; charset=utf-8", b"ok")
        if path in (b"/metrics", b"/metrics/"):
            return self._metrics_text(request)
        if path == b"/dashboard":
            request.setHeader(b"location", b"/dashboard/")
            return self._json(request, 301, {"location": "/dashboard/"})
        if path.startswith(b"/dashboard/"):
            return self._static(request, path[len(b"/dashboard/") :])
        if path == API_PREFIX or path.startswith(API_PREFIX + b"/"):
            return self._api(request, path[len(API_PREFIX) :])
        return self._not_found(request)

    def _api(self, request: Request, rest: bytes) -> bytes:
        if rest.endswith(b"/"):
            rest = rest[:-1]
        parts = rest.split(b"/")[1:]
        if len(parts) == 1:
            endpoint = parts[0]
            if endpoint == b"health":
                return self._json(request, 200, self._health())
            if endpoint == b"metrics":
                return self._metrics_text(request)
            if endpoint == b"config":
                return self._json(request, 200, redacted_config(self.gateway.config))
            if endpoint == b"routes":
                return self._json(request, 200, [self._route(r) for r in self._routes()])
            if endpoint == b"services":
                services = self.gateway.registry.services.values()
                return self._json(request, 200, [self._service(s) for s in services])
            if endpoint == b"backends":
                return self._json(request, 200, self._backends())
            if endpoint == b"version":
                version = {"name": "a3s-gateway", "version": a3s_gateway.__version__}
                return self._json(request, 200, version)
            if endpoint == b"stats":
                return self._json(request, 200, self._stats())
        elif len(parts) == 2 and parts[0] in (b"routes", b"services"):
            name = unquote_to_bytes(parts[1]).decode("utf-8", "replace")
            if parts[0] == b"routes":
                for route in self._routes():
                    if route.name == name:
                        return self._json(request, 200, self._route(route))
                return self._json(request, 404, {"error": "Route not found"})
            service = self.gateway.registry.services.get(name)
            if service is None:
                return self._json(request, 404, {"error": "Service not found"})
            return self._json(request, 200, self._service(service))
        return self._not_found(request)

    def _routes(self) -> Tuple[Route, ...]:
        return self.gateway.routes.routes

    def _state(self) -> str:
        gateway = self.gateway
        if gateway.running:
            # The gateway closes its listening ports first thing when it stops, then drains.
            return "Running" if gateway.ports else "Stopping"
        return "Created" if self.stats.started_at is None else "Stopped"

    def _health(self) -> Dict[str, Any]:
        started = self.stats.started_at
        uptime = 0 if started is None else int(self._clock.seconds() - started)
        total = self.stats.total if self._total_requests is None else self._total_requests()
        return {
            "state": self._state(),
            "uptime_secs": uptime,
            "active_connections": sum(len(s.channels) for s in self.gateway.sites.values()),
            "total_requests": total,
        }

    def _route(self, route: Route) -> Dict[str, Any]:
        configured = self.gateway.config.routers.get(route.name)
        # The configured order reads better than a set's; both hold the same names.
        entrypoints = (
            list(configured.entrypoints) if configured is not None else sorted(route.entrypoints)
        )
        return {
            "name": route.name,
            "rule": route.rule,
            "service": route.service,
            "entrypoints": entrypoints,
            "middlewares": list(route.middlewares),
            "priority": route.priority,
        }

    def _backend(self, backend: Backend) -> Dict[str, Any]:
        ejected_until = backend.ejected_until
        requests, error_rate = self.stats.backend_errors(backend.url)
        return {
            "url": redact_url(backend.url),
            "weight": backend.weight,
            "healthy": backend.healthy,
            "active_connections": backend.active_connections,
            "active_healthy": backend.active_healthy,
            "ejected": ejected_until is not None and self._clock.seconds() < ejected_until,
            "recent_requests": requests,
            "recent_error_rate": error_rate,
        }

    def _service(self, service: GatewayService) -> Dict[str, Any]:
        backends = [self._backend(b) for b in service.balancer.backends]
        strategy = service.balancer.strategy
        return {
            "name": service.name,
            "strategy": STRATEGY_NAMES.get(strategy, strategy),
            "backends_total": len(backends),
            "backends_healthy": sum(1 for b in backends if b["healthy"]),
            "backends": backends,
        }

    def _backends(self) -> List[Dict[str, Any]]:
        return [
            {"service": name, **self._backend(backend)}
            for name, service in self.gateway.registry.services.items()
            for backend in service.balancer.backends
        ]

    def _stats(self) -> Dict[str, Any]:
        return {
            "now": round(self._clock.seconds(), 3),
            "window_secs": self.stats.window_secs,
            "interval_secs": 1,
            "series": self.stats.series(),
        }

    def _metrics_text(self, request: Request) -> bytes:
        body, content_type = self._metrics()
        return self._send(request, 200, content_type, body)

    def _static(self, request: Request, name: bytes) -> bytes:
        filename = name.decode("latin-1") or "index.html"
        content_type = _STATIC.get(filename)
        if content_type is None:
            return self._not_found(request)
        request.setHeader(b"cache-control", b"no-cache")
        if filename == "index.html":
            request.setHeader(b"content-security-policy", _PAGE_POLICY)
            request.setHeader(b"referrer-policy", b"no-referrer")
        return self._send(request, 200, content_type, self._files[filename])

    def _not_found(self, request: Request) -> bytes:
        return self._json(request, 404, {"error": "Not found"})

    def _json(self, request: Request, code: int, payload: object) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        body = json.dumps(payload, indent=2).encode("utf-8")
        return self._send(request, code, _JSON, body)

    @staticmethod
    def _send(request: Request, code: int, content_type: bytes, body: bytes) -> bytes:
        """
        Set the status and headers and return the body for twisted.web to write; a HEAD answer
        carries the GET answer's length and no body.
        """
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        if request.method == b"HEAD":
            return b""
        return body
