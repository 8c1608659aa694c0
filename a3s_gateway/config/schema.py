# -*- test-case-name: tests.test_config_load -*-
"""
The configuration schema: frozen attrs value objects mirroring A3S Gateway's ``gateway.hcl``.

Every class holds already-validated, already-defaulted values; durations are float seconds.
:mod:`a3s_gateway.config.load` builds them from HCL and :mod:`a3s_gateway.config.validate`
checks the cross references.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import attr

DEFAULT_MAX_REQUEST_BODY_BYTES = 33554432


@attr.s(frozen=True, auto_attribs=True)
class TlsConfig:
    """An HTTP entrypoint's ``tls { }`` block."""

    cert_file: str
    key_file: str
    min_version: str = "1.2"
    acme: bool = False
    acme_email: Optional[str] = None
    acme_domains: Tuple[str, ...] = ()
    acme_staging: bool = False
    acme_storage_path: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class ForwardedHeadersConfig:
    """``forwarded_headers { trusted_ips = [...] }``: peers whose X-Forwarded-* are believed."""

    trusted_ips: Tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class EntrypointConfig:
    """``entrypoints "<name>" { }``."""

    name: str
    address: str
    protocol: str = "http"
    tls: Optional[TlsConfig] = None
    max_connections: Optional[int] = None
    tcp_allowed_ips: Tuple[str, ...] = ()
    udp_session_timeout_secs: Optional[int] = None
    udp_max_sessions: Optional[int] = None
    forwarded_headers: ForwardedHeadersConfig = ForwardedHeadersConfig()
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES


@attr.s(frozen=True, auto_attribs=True)
class RouterConfig:
    """``routers "<name>" { }``. A lower ``priority`` is tried first."""

    name: str
    rule: str
    service: str
    entrypoints: Tuple[str, ...] = ()
    middlewares: Tuple[str, ...] = ()
    priority: int = 0


@attr.s(frozen=True, auto_attribs=True)
class ServerConfig:
    """One ``{ url = ..., weight = ... }`` of ``load_balancer.servers``."""

    url: str
    weight: int = 1


@attr.s(frozen=True, auto_attribs=True)
class HealthCheckConfig:
    """``load_balancer { health_check { } }``: active probes."""

    path: str
    interval: float = 10.0
    timeout: float = 5.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1


@attr.s(frozen=True, auto_attribs=True)
class StickyConfig:
    """``load_balancer { sticky { } }``: cookie-bound sessions."""

    cookie: str
    ttl: float = 3600.0
    max_sessions: int = 100000


@attr.s(frozen=True, auto_attribs=True)
class PassiveHealthConfig:
    """``load_balancer { passive_health { } }``: ejection on error responses, readmission."""

    enabled: bool = True
    error_threshold: int = 5
    window: float = 30.0
    recovery_time: float = 30.0
    error_statuses: Tuple[int, ...] = (500, 502, 503, 504)


@attr.s(frozen=True, auto_attribs=True)
class LoadBalancerConfig:
    """``services "<name>" { load_balancer { } }``."""

    strategy: str = "round-robin"
    servers: Tuple[ServerConfig, ...] = ()
    health_check: Optional[HealthCheckConfig] = None
    sticky: Optional[StickyConfig] = None
    passive_health: PassiveHealthConfig = PassiveHealthConfig()


@attr.s(frozen=True, auto_attribs=True)
class TimeoutsConfig:
    """``services "<name>" { timeouts { } }``: per-phase upstream timeouts, 0 meaning none."""

    connect: float = 5.0
    response_header: float = 300.0
    idle: float = 300.0
    total: float = 0.0


@attr.s(frozen=True, auto_attribs=True)
class ScalingConfig:
    """``scaling { }`` (validated; the autoscaler is not part of this gateway)."""

    min_replicas: int = 0
    max_replicas: int = 10
    container_concurrency: int = 0
    target_utilization: float = 0.7
    scale_down_delay_secs: int = 300
    buffer_timeout_secs: int = 30
    buffer_size: int = 100
    buffer_enabled: bool = False
    executor: str = "box"


@attr.s(frozen=True, auto_attribs=True)
class RevisionConfig:
    """One item of ``revisions = [...]``."""

    name: str
    traffic_percent: int = 100
    servers: Tuple[ServerConfig, ...] = ()
    strategy: str = "round-robin"


@attr.s(frozen=True, auto_attribs=True)
class RolloutConfig:
    """``rollout { }`` (validated only, as in the reference)."""

    from_: str
    to: str
    step_percent: int = 10
    step_interval_secs: int = 60
    error_rate_threshold: float = 0.05
    latency_threshold_ms: int = 5000


@attr.s(frozen=True, auto_attribs=True)
class MirrorConfig:
    """``mirror { }``: copy a share of requests to a shadow service."""

    service: str
    percentage: int = 100


@attr.s(frozen=True, auto_attribs=True)
class FailoverConfig:
    """``failover { }``: the service used when the primary has no healthy backend."""

    service: str


@attr.s(frozen=True, auto_attribs=True)
class ServiceConfig:
    """``services "<name>" { }``."""

    name: str
    load_balancer: LoadBalancerConfig
    timeouts: TimeoutsConfig = TimeoutsConfig()
    scaling: Optional[ScalingConfig] = None
    revisions: Tuple[RevisionConfig, ...] = ()
    rollout: Optional[RolloutConfig] = None
    mirror: Optional[MirrorConfig] = None
    failover: Optional[FailoverConfig] = None


@attr.s(frozen=True, auto_attribs=True)
class MiddlewareConfig:
    """
    ``middlewares "<name>" { type = ... }``: the reference's flat bag of keys.

    ``options`` holds every key other than ``type`` exactly as written (after normalisation of
    the HCL shape), so that each middleware type reads the keys it knows.
    """

    name: str
    type: str
    options: Mapping[str, object] = attr.ib(factory=dict)


@attr.s(frozen=True, auto_attribs=True)
class FileProviderConfig:
    watch: bool = True
    directory: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class ProvidersConfig:
    """``providers { }``: parsed and validated; only ``file`` has an effect here."""

    file: Optional[FileProviderConfig] = None
    discovery: Optional[Mapping[str, object]] = None
    kubernetes: Optional[Mapping[str, object]] = None
    docker: Optional[Mapping[str, object]] = None


@attr.s(frozen=True, auto_attribs=True)
class AccessLogConfig:
    """``access_log { path = ... }``: one JSON object per request; ``"-"`` is stdout."""

    path: str


@attr.s(frozen=True, auto_attribs=True)
class TracingConfig:
    """``tracing { }``: trace-context propagation and OTLP/HTTP span export."""

    propagation: str = "w3c"
    sample_rate: float = 1.0
    service_name: str = "a3s-gateway"
    otlp_endpoint: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class DashboardConfig:
    """``dashboard { }``: the admin API, ``/metrics``, ``/ping`` and ``/dashboard/``."""

    entrypoint: str
    middlewares: Tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class GatewayConfig:
    """The whole ``gateway.hcl``; ``source`` is the file it came from, for messages."""

    entrypoints: Mapping[str, EntrypointConfig] = attr.ib(factory=dict)
    routers: Mapping[str, RouterConfig] = attr.ib(factory=dict)
    services: Mapping[str, ServiceConfig] = attr.ib(factory=dict)
    middlewares: Mapping[str, MiddlewareConfig] = attr.ib(factory=dict)
    providers: ProvidersConfig = ProvidersConfig()
    shutdown_timeout_secs: int = 30
    workers: int = 1
    access_log: Optional[AccessLogConfig] = None
    tracing: Optional[TracingConfig] = None
    dashboard: Optional[DashboardConfig] = None
    source: str = "<string>"
