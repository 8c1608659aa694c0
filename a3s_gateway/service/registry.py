# -*- test-case-name: tests.test_registry -*-
"""
L{Service} and L{ServiceRegistry}: the runtime form of C{services "<name>" { }}.

The proxy looks a router's service up in the registry, asks L{Service.select} for the backend
of each request (sticky session, then strategy, then failover), and reports every response
with L{Service.record_response}. The gateway adds L{ServiceRegistry.health_checkers} to its
service tree. Scaling, revisions and rollout are validated elsewhere and ignored here.
"""

from __future__ import annotations

import random as _random
from typing import Container, Dict, FrozenSet, List, Mapping, Optional, Tuple

import attr
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from a3s_gateway.config.schema import GatewayConfig, ServiceConfig
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.balancer import LoadBalancer
from a3s_gateway.service.health import HealthChecker
from a3s_gateway.service.mirror import MirrorSampler
from a3s_gateway.service.passive import PassiveHealth
from a3s_gateway.service.sticky import StickySessions

log = Logger()

NO_HEALTHY_BACKENDS = "No healthy backends"
NO_HEALTHY_BACKENDS_WITH_FAILOVER = "No healthy backends (primary + failover)"


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Selection:
    """
    The backend chosen for one request.

    @ivar backend: Where to send the request.
    @ivar set_cookie: A full C{Set-Cookie} value to add to the response (a new sticky
        session), or C{None}.
    @ivar failover: Whether the backend comes from the failover service.
    """

    backend: Backend
    set_cookie: Optional[bytes]
    failover: bool


class Service:
    """
    One service at runtime.

    @ivar name: The service name.
    @ivar config: Its configuration.
    @ivar balancer: Its backends and strategy.
    @ivar passive: Its passive health, or C{None} when disabled.
    @ivar sticky: Its session table, or C{None} without C{sticky { }}.
    @ivar mirror: The shadow service and its sampler, or C{None}.
    @ivar failover: The failover service, or C{None}.
    @ivar timeouts: Its upstream timeouts.
    """

    def __init__(
        self,
        config: ServiceConfig,
        balancer: LoadBalancer,
        passive: Optional[PassiveHealth] = None,
        sticky: Optional[StickySessions] = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.balancer = balancer
        self.passive = passive
        self.sticky = sticky
        self.mirror: Optional[Tuple[Service, MirrorSampler]] = None
        self.failover: Optional[Service] = None
        self.timeouts = config.timeouts
        self._backends: FrozenSet[Backend] = frozenset(balancer.backends)
        # Plain selections never change: built once, not once per request.
        self._plain: Dict[Backend, Selection] = {
            backend: Selection(backend, None, False) for backend in balancer.backends
        }

    @classmethod
    def from_config(
        cls,
        config: ServiceConfig,
        clock: IReactorTime,
        random: Optional[_random.Random] = None,
    ) -> Service:
        """Build a service (without its mirror and failover, which the registry resolves)."""
        lb = config.load_balancer
        balancer = LoadBalancer([Backend.from_config(s) for s in lb.servers], lb.strategy, random)
        passive = PassiveHealth(lb.passive_health, clock) if lb.passive_health.enabled else None
        sticky = StickySessions(lb.sticky, clock) if lb.sticky is not None else None
        return cls(config, balancer, passive, sticky)

    def select(
        self, headers: Headers, secure: bool, exclude: Container[Backend] = ()
    ) -> Optional[Selection]:
        """
        Choose the backend for a request: by sticky session when configured, else by the
        strategy; when the primary has no healthy backend at all, from the failover service by
        its strategy. C{None} when there is nothing (answer 503 with
        L{no_backend_message}).

        @param headers: The request headers (for the sticky cookie).
        @param secure: Whether the request came over TLS (for the cookie's C{Secure}).
        @param exclude: Backends already tried for this request (retries).
        """
        sticky = self.sticky
        if sticky is not None:
            choice = sticky.select(headers, self.balancer, secure, exclude)
            if choice is not None:
                backend, set_cookie = choice
                if set_cookie is None:
                    return self._plain[backend]
                return Selection(backend, set_cookie, False)
        else:
            chosen = self.balancer.next_backend(exclude)
            if chosen is not None:
                return self._plain[chosen]
        failover = self.failover
        if failover is None:
            return None
        if exclude and any(b.healthy for b in self.balancer.backends):
            # Healthy but already tried: failover is for a primary that is down (spec 1.10).
            return None
        spare = failover.balancer.next_backend(exclude)
        if spare is None:
            return None
        return Selection(spare, None, True)

    def no_backend_message(self) -> str:
        """The error for the 503 answered when L{select} finds nothing."""
        if self.failover is not None:
            return NO_HEALTHY_BACKENDS_WITH_FAILOVER
        return NO_HEALTHY_BACKENDS

    def record_response(self, backend: Backend, status: int) -> None:
        """
        Feed passive health with a response status (the gateway's own 502 for an upstream
        failure included). A failover backend is accounted by the failover service.
        """
        owner = self
        if backend not in self._backends:
            failover = self.failover
            if failover is None or backend not in failover._backends:
                return
            owner = failover
        if owner.passive is not None:
            owner.passive.record(backend, status)

    def __repr__(self) -> str:
        return f"<Service {self.name} strategy={self.balancer.strategy}>"


class ServiceRegistry:
    """
    Every service of the configuration, by name.

    @ivar services: The services.
    @ivar health_checkers: One L{HealthChecker} per service with C{health_check}; not started
        (the gateway adds them to its service tree).
    """

    def __init__(self, services: Mapping[str, Service], health_checkers: List[IService]) -> None:
        self.services = services
        self.health_checkers = health_checkers

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        clock: IReactorTime,
        agent: IAgent,
        random: Optional[_random.Random] = None,
    ) -> ServiceRegistry:
        """
        Build every service and resolve mirror and failover targets by name.

        @param clock: For passive health, sticky TTLs and health-check scheduling.
        @param agent: The HTTP client the health checkers probe with.
        @param random: The source for the C{random} strategy (shared by all services).
        """
        services: Dict[str, Service] = {
            name: Service.from_config(service_config, clock, random)
            for name, service_config in config.services.items()
        }
        checkers: List[IService] = []
        for name, service in services.items():
            service_config = service.config
            if service_config.mirror is not None:
                shadow = services.get(service_config.mirror.service)
                if shadow is None:
                    log.warn(
                        "Service {service}: mirror service {target} not found, mirroring disabled",
                        service=name,
                        target=service_config.mirror.service,
                    )
                else:
                    service.mirror = (shadow, MirrorSampler(service_config.mirror.percentage))
            if service_config.failover is not None:
                backup = services.get(service_config.failover.service)
                if backup is None:
                    log.warn(
                        "Service {service}: failover service {target} not found, failover disabled",
                        service=name,
                        target=service_config.failover.service,
                    )
                else:
                    service.failover = backup
            health_check = service_config.load_balancer.health_check
            if health_check is not None:
                checkers.append(
                    HealthChecker(name, service.balancer.backends, health_check, clock, agent)
                )
        return cls(services, checkers)
