# -*- test-case-name: tests.test_config_load -*-
"""
The gateway's configuration: ``gateway.hcl`` loading, complete validation, the schema objects
and the ``validate`` summary, for the CLI, the twistd plugin and the gateway.

``load_config``/``parse_config`` return a validated :class:`GatewayConfig` or raise a
:class:`ConfigError` (``ConfigNotFound``, ``ConfigParseError``, ``ConfigValidationError``).
"""

from __future__ import annotations

from a3s_gateway.config.durations import parse_duration
from a3s_gateway.config.errors import (
    ConfigError,
    ConfigNotFound,
    ConfigParseError,
    ConfigValidationError,
)
from a3s_gateway.config.load import apply_listen, load_config, parse_config
from a3s_gateway.config.schema import (
    AccessLogConfig,
    DashboardConfig,
    EntrypointConfig,
    FailoverConfig,
    FileProviderConfig,
    ForwardedHeadersConfig,
    GatewayConfig,
    HealthCheckConfig,
    LoadBalancerConfig,
    MiddlewareConfig,
    MirrorConfig,
    PassiveHealthConfig,
    ProvidersConfig,
    RevisionConfig,
    RolloutConfig,
    RouterConfig,
    ScalingConfig,
    ServerConfig,
    ServiceConfig,
    StickyConfig,
    TimeoutsConfig,
    TlsConfig,
    TracingConfig,
)
from a3s_gateway.config.summary import validation_summary
from a3s_gateway.config.validate import check_ip_or_cidr, parse_address, validate_config

__all__ = [
    "AccessLogConfig",
    "ConfigError",
    "ConfigNotFound",
    "ConfigParseError",
    "ConfigValidationError",
    "DashboardConfig",
    "EntrypointConfig",
    "FailoverConfig",
    "FileProviderConfig",
    "ForwardedHeadersConfig",
    "GatewayConfig",
    "HealthCheckConfig",
    "LoadBalancerConfig",
    "MiddlewareConfig",
    "MirrorConfig",
    "PassiveHealthConfig",
    "ProvidersConfig",
    "RevisionConfig",
    "RolloutConfig",
    "RouterConfig",
    "ScalingConfig",
    "ServerConfig",
    "ServiceConfig",
    "StickyConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "TracingConfig",
    "apply_listen",
    "check_ip_or_cidr",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
    "validate_config",
    "validation_summary",
]
