# -*- test-case-name: tests.test_registry -*-
"""Tests for L{a3s_gateway.service.registry} (and the package's exports)."""

from __future__ import annotations

import random
from typing import Any, Optional

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

import a3s_gateway.service
from a3s_gateway.config.schema import (
    FailoverConfig,
    GatewayConfig,
    HealthCheckConfig,
    LoadBalancerConfig,
    MirrorConfig,
    PassiveHealthConfig,
    RevisionConfig,
    ScalingConfig,
    ServerConfig,
    ServiceConfig,
    StickyConfig,
    TimeoutsConfig,
)
from a3s_gateway.service.health import HealthChecker
from a3s_gateway.service.registry import Selection, Service, ServiceRegistry


def service_config(name: str, *urls: str, **lb: Any) -> ServiceConfig:
    extra = {k: lb.pop(k) for k in list(lb) if k in ("mirror", "failover", "timeouts")}
    servers = tuple(ServerConfig(url=u) for u in urls)
    return ServiceConfig(
        name=name, load_balancer=LoadBalancerConfig(servers=servers, **lb), **extra
    )


def registry(*services: ServiceConfig, clock: Optional[Clock] = None) -> ServiceRegistry:
    config = GatewayConfig(services={s.name: s for s in services})
    return ServiceRegistry.from_config(
        config, clock or Clock(), RequestTraversalAgent(Resource()), random.Random(0)
    )


class ServiceRegistryTests(SynchronousTestCase):
    """Building every service from the configuration."""

    def test_services_by_name(self) -> None:
        """Every configured service is built, with its backends, strategy and timeouts."""
        timeouts = TimeoutsConfig(connect=1.0)
        reg = registry(
            service_config("api", "http://a:1", "http://b:2", strategy="least-connections"),
            service_config("web", "http://c", timeouts=timeouts),
        )
        self.assertEqual(sorted(reg.services), ["api", "web"])
        api = reg.services["api"]
        self.assertEqual(api.name, "api")
        self.assertEqual([b.url for b in api.balancer.backends], ["http://a:1", "http://b:2"])
        self.assertEqual(api.balancer.strategy, "least-connections")
        self.assertEqual(reg.services["web"].timeouts, timeouts)

    def test_health_checkers(self) -> None:
        """One health checker per service with C{health_check}, over that service's backends."""
        reg = registry(
            service_config("api", "http://a", health_check=HealthCheckConfig(path="/h")),
            service_config("web", "http://c"),
        )
        self.assertEqual(len(reg.health_checkers), 1)
        checker = reg.health_checkers[0]
        assert isinstance(checker, HealthChecker)
        self.assertEqual(checker.name, "health-check:api")
        self.assertEqual(checker.backends, reg.services["api"].balancer.backends)
        self.assertFalse(checker.running)

    def test_mirror_and_failover_resolved(self) -> None:
        """Mirror and failover targets are resolved to the services of those names."""
        reg = registry(
            service_config(
                "api",
                "http://a",
                mirror=MirrorConfig(service="shadow", percentage=10),
                failover=FailoverConfig(service="backup"),
            ),
            service_config("shadow", "http://s"),
            service_config("backup", "http://b"),
        )
        api = reg.services["api"]
        assert api.mirror is not None
        shadow, sampler = api.mirror
        self.assertIs(shadow, reg.services["shadow"])
        self.assertEqual(sampler.percentage, 10)
        self.assertIs(api.failover, reg.services["backup"])
        self.assertIsNone(reg.services["shadow"].mirror)
        self.assertIsNone(reg.services["shadow"].failover)

    def test_unknown_targets_skipped(self) -> None:
        """Unknown mirror or failover targets disable the feature instead of failing."""
        reg = registry(
            service_config(
                "api",
                "http://a",
                mirror=MirrorConfig(service="nope"),
                failover=FailoverConfig(service="nada"),
            )
        )
        api = reg.services["api"]
        self.assertEqual((api.mirror, api.failover), (None, None))
        self.assertEqual(api.no_backend_message(), "No healthy backends")

    def test_passive_and_sticky_built(self) -> None:
        """Passive health is on by default and off when disabled; sticky only when set."""
        reg = registry(
            service_config("on", "http://a", sticky=StickyConfig(cookie="s")),
            service_config("off", "http://b", passive_health=PassiveHealthConfig(enabled=False)),
        )
        self.assertIsNotNone(reg.services["on"].passive)
        self.assertIsNotNone(reg.services["on"].sticky)
        self.assertIsNone(reg.services["off"].passive)
        self.assertIsNone(reg.services["off"].sticky)

    def test_scaling_and_revisions_ignored(self) -> None:
        """Scaling and revisions are accepted and have no effect on selection."""
        config = ServiceConfig(
            name="api",
            load_balancer=LoadBalancerConfig(servers=(ServerConfig(url="http://a"),)),
            scaling=ScalingConfig(container_concurrency=1),
            revisions=(RevisionConfig(name="v2", servers=(ServerConfig(url="http://v2"),)),),
        )
        api = registry(config).services["api"]
        self.assertEqual([b.url for b in api.balancer.backends], ["http://a"])

    def test_package_exports(self) -> None:
        """The package re-exports the public names of its modules."""
        self.assertIs(a3s_gateway.service.ServiceRegistry, ServiceRegistry)
        self.assertIs(a3s_gateway.service.Selection, Selection)
        for name in a3s_gateway.service.__all__:
            self.assertTrue(hasattr(a3s_gateway.service, name), name)

    def test_service_repr(self) -> None:
        """A service's repr names it and its strategy."""
        api = registry(service_config("api", "http://a")).services["api"]
        self.assertIsInstance(api, Service)
        self.assertEqual(repr(api), "<Service api strategy=round-robin>")


class SelectTests(SynchronousTestCase):
    """L{Service.select}: sticky, then strategy, then failover."""

    def test_strategy(self) -> None:
        """Without sticky, the strategy chooses; no cookie, not failover."""
        api = registry(service_config("api", "http://a", "http://b")).services["api"]
        a, b = api.balancer.backends
        chosen = [api.select(Headers(), False) for _ in range(3)]
        self.assertEqual(
            chosen,
            [Selection(a, None, False), Selection(b, None, False), Selection(a, None, False)],
        )

    def test_exclude(self) -> None:
        """C{exclude} reaches the strategy (a retry gets another backend)."""
        api = registry(service_config("api", "http://a", "http://b")).services["api"]
        a, b = api.balancer.backends
        for _ in range(3):
            selection = api.select(Headers(), False, exclude={a})
            assert selection is not None
            self.assertIs(selection.backend, b)

    def test_sticky(self) -> None:
        """With sticky, a new client gets a cookie and then sticks to its backend."""
        api = registry(
            service_config("api", "http://a", "http://b", sticky=StickyConfig(cookie="s"))
        ).services["api"]
        first = api.select(Headers(), True)
        assert first is not None and first.set_cookie is not None
        self.assertTrue(first.set_cookie.endswith(b"; Secure"))
        session = first.set_cookie.split(b";")[0]
        for _ in range(3):
            again = api.select(Headers({b"Cookie": [session]}), True)
            self.assertEqual(again, Selection(first.backend, None, False))

    def failover_pair(self, **primary: Any) -> ServiceRegistry:
        return registry(
            service_config(
                "api", "http://a", "http://b", failover=FailoverConfig(service="backup"), **primary
            ),
            service_config("backup", "http://x", "http://y"),
        )

    def test_primary_preferred(self) -> None:
        """While the primary has a healthy backend, failover is not used."""
        reg = self.failover_pair()
        api = reg.services["api"]
        api.balancer.backends[0].active_healthy = False
        self.assertEqual(
            api.select(Headers(), False), Selection(api.balancer.backends[1], None, False)
        )

    def test_failover_when_primary_down(self) -> None:
        """
        With no healthy primary backend, the failover service's strategy chooses, and
        traffic returns to the primary when it recovers.
        """
        reg = self.failover_pair()
        api, backup = reg.services["api"], reg.services["backup"]
        for b in api.balancer.backends:
            b.active_healthy = False
        x, y = backup.balancer.backends
        self.assertEqual(
            [api.select(Headers(), False) for _ in range(3)],
            [Selection(x, None, True), Selection(y, None, True), Selection(x, None, True)],
        )
        api.balancer.backends[0].active_healthy = True
        selection = api.select(Headers(), False)
        assert selection is not None
        self.assertFalse(selection.failover)

    def test_failover_with_sticky(self) -> None:
        """A sticky primary with no healthy backend also fails over (without a cookie)."""
        reg = self.failover_pair(sticky=StickyConfig(cookie="s"))
        api, backup = reg.services["api"], reg.services["backup"]
        for b in api.balancer.backends:
            b.active_healthy = False
        self.assertEqual(
            api.select(Headers(), False), Selection(backup.balancer.backends[0], None, True)
        )

    def test_no_failover_for_excluded_primary(self) -> None:
        """
        Failover is for a primary that is down: when its healthy backends were only tried
        (excluded by a retry), there is no selection.
        """
        reg = self.failover_pair()
        api = reg.services["api"]
        self.assertIsNone(api.select(Headers(), False, exclude=set(api.balancer.backends)))

    def test_failover_exclude(self) -> None:
        """A retry on the failover service gets another failover backend."""
        reg = self.failover_pair()
        api, backup = reg.services["api"], reg.services["backup"]
        for b in api.balancer.backends:
            b.active_healthy = False
        x, y = backup.balancer.backends
        for _ in range(3):
            self.assertEqual(api.select(Headers(), False, exclude={x}), Selection(y, None, True))

    def test_nothing_healthy(self) -> None:
        """With nothing healthy anywhere, there is no selection and the message says so."""
        reg = self.failover_pair()
        api, backup = reg.services["api"], reg.services["backup"]
        for b in api.balancer.backends + backup.balancer.backends:
            b.active_healthy = False
        self.assertIsNone(api.select(Headers(), False))
        self.assertEqual(api.no_backend_message(), "No healthy backends (primary + failover)")

    def test_no_backend_message_without_failover(self) -> None:
        """Without failover the message is the reference's plain one."""
        api = registry(service_config("api", "http://a")).services["api"]
        api.balancer.backends[0].active_healthy = False
        self.assertIsNone(api.select(Headers(), False))
        self.assertEqual(api.no_backend_message(), "No healthy backends")

    def test_failover_chain_not_followed(self) -> None:
        """Only the failover's own strategy is used, never the failover's failover."""
        reg = registry(
            service_config("a", "http://a", failover=FailoverConfig(service="b")),
            service_config("b", "http://b", failover=FailoverConfig(service="c")),
            service_config("c", "http://c"),
        )
        for name in ("a", "b"):
            reg.services[name].balancer.backends[0].active_healthy = False
        self.assertIsNone(reg.services["a"].select(Headers(), False))


class RecordResponseTests(SynchronousTestCase):
    """L{Service.record_response} feeds passive health."""

    def test_ejects_and_recovers(self) -> None:
        """
        Five 502s eject a backend (the reference's E2E: then 503 No healthy backends), and
        without active checks it comes back after the recovery time.
        """
        clock = Clock()
        api = registry(service_config("api", "http://a"), clock=clock).services["api"]
        (a,) = api.balancer.backends
        for _ in range(5):
            selection = api.select(Headers(), False)
            assert selection is not None
            api.record_response(selection.backend, 502)
        self.assertIsNone(api.select(Headers(), False))
        clock.advance(30)
        self.assertEqual(api.select(Headers(), False), Selection(a, None, False))

    def test_disabled(self) -> None:
        """With passive health disabled, errors are ignored."""
        api = registry(
            service_config("api", "http://a", passive_health=PassiveHealthConfig(enabled=False))
        ).services["api"]
        (a,) = api.balancer.backends
        for _ in range(10):
            api.record_response(a, 502)
        self.assertTrue(a.healthy)

    def test_failover_backend_accounted_by_failover(self) -> None:
        """A failover backend's errors count with the failover service's settings."""
        reg = registry(
            service_config(
                "api",
                "http://a",
                failover=FailoverConfig(service="backup"),
                passive_health=PassiveHealthConfig(enabled=False),
            ),
            service_config(
                "backup", "http://x", passive_health=PassiveHealthConfig(error_threshold=2)
            ),
        )
        api, backup = reg.services["api"], reg.services["backup"]
        (x,) = backup.balancer.backends
        api.record_response(x, 500)
        self.assertTrue(x.healthy)
        api.record_response(x, 500)
        self.assertFalse(x.healthy)

    def test_foreign_backend_ignored(self) -> None:
        """A backend of an unrelated service is not accounted (even with failover cycles)."""
        reg = registry(
            service_config("a", "http://a", failover=FailoverConfig(service="b")),
            service_config("b", "http://b", failover=FailoverConfig(service="a")),
            service_config("c", "http://c"),
        )
        (c,) = reg.services["c"].balancer.backends
        for _ in range(10):
            reg.services["a"].record_response(c, 502)
        self.assertTrue(c.healthy)
