# -*- test-case-name: tests.test_table -*-
"""
The route table: every router's compiled rule, in the order they are tried.

For the gateway, which builds one table from the configuration's routers, and for the proxy,
which asks it for the route of each request. The order is total and never depends on the
order the routers were given in: a lower ``priority`` first, then the longer rule (Traefik's
specificity, in UTF-8 bytes as Traefik counts), then the router's name.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

import attr

from a3s_gateway.config.schema import RouterConfig
from a3s_gateway.router.rule import Matcher, RequestFacts, RuleError, parse_rule


@attr.s(frozen=True, auto_attribs=True)
class Route:
    """One router, compiled. An empty ``entrypoints`` means every entrypoint."""

    name: str
    rule: str
    matcher: Matcher
    service: str
    entrypoints: FrozenSet[str]
    middlewares: Tuple[str, ...]
    priority: int

    @classmethod
    def from_config(cls, name: str, config: RouterConfig) -> Route:
        """Compile one router; raise :class:`InvalidRule` if its rule does not parse."""
        try:
            matcher = parse_rule(config.rule)
        except RuleError as error:
            raise InvalidRule(name, config.rule, error) from error
        return cls(
            name=name,
            rule=config.rule,
            matcher=matcher,
            service=config.service,
            entrypoints=frozenset(config.entrypoints),
            middlewares=tuple(config.middlewares),
            priority=config.priority,
        )


class InvalidRule(Exception):
    """A router whose rule does not parse; ``error`` says why and where."""

    def __init__(self, router: str, rule: str, error: RuleError) -> None:
        super().__init__(router, rule, error)
        self.router = router
        self.rule = rule
        self.error = error

    def __str__(self) -> str:
        return f"Router '{self.router}': invalid rule '{self.rule}': {self.error}"


def _evaluation_order(route: Route) -> Tuple[int, int, str]:
    return (route.priority, -len(route.rule.encode("utf-8", "surrogatepass")), route.name)


class RouteTable:
    """
    Routes in evaluation order; :meth:`match` returns the first whose rule matches.

    Route names must be unique: with the name as the last tie-breaker, that makes the order
    total.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: Tuple[Route, ...] = tuple(sorted(routes, key=_evaluation_order))
        counts = Counter(route.name for route in self.routes)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"Duplicate route names: {', '.join(duplicates)}")
        self._restricted: FrozenSet[str] = frozenset().union(
            *(route.entrypoints for route in self.routes)
        )
        # Any entrypoint no router names sees only the unrestricted routes: one shared list, so
        # the per-entrypoint cache below holds at most one entry per name a router lists.
        self._unrestricted = tuple(route for route in self.routes if not route.entrypoints)
        self._by_entrypoint: Dict[str, Tuple[Route, ...]] = {}

    @classmethod
    def from_config(cls, routers: Mapping[str, RouterConfig]) -> RouteTable:
        """
        Compile every router, keyed by router name; raise :class:`InvalidRule` for the first
        bad rule in the mapping's order.
        """
        return cls(Route.from_config(name, config) for name, config in routers.items())

    def routes_for(self, entrypoint: str) -> Tuple[Route, ...]:
        """The routes a request arriving on ``entrypoint`` may take, in evaluation order."""
        if entrypoint not in self._restricted:
            return self._unrestricted
        routes = self._by_entrypoint.get(entrypoint)
        if routes is None:
            routes = tuple(
                route
                for route in self.routes
                if not route.entrypoints or entrypoint in route.entrypoints
            )
            self._by_entrypoint[entrypoint] = routes
        return routes

    def match(self, entrypoint: str, facts: RequestFacts) -> Optional[Route]:
        """The first route for ``entrypoint`` whose rule matches the request, or None."""
        for route in self.routes_for(entrypoint):
            if route.matcher.matches(facts):
                return route
        return None
