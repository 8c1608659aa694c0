# -*- test-case-name: tests.test_registry -*-
"""
Services: backends, load balancing, sticky sessions, active and passive health, mirroring and
failover. The proxy and the gateway use L{ServiceRegistry} and what it holds.
"""

from __future__ import annotations

from a3s_gateway.service.backend import Backend
from a3s_gateway.service.balancer import STRATEGIES, LoadBalancer
from a3s_gateway.service.health import HealthChecker
from a3s_gateway.service.mirror import MirrorSampler
from a3s_gateway.service.passive import PassiveHealth
from a3s_gateway.service.registry import Selection, Service, ServiceRegistry
from a3s_gateway.service.sticky import StickySessions

__all__ = [
    "STRATEGIES",
    "Backend",
    "HealthChecker",
    "LoadBalancer",
    "MirrorSampler",
    "PassiveHealth",
    "Selection",
    "Service",
    "ServiceRegistry",
    "StickySessions",
]
