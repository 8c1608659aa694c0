"""
Tests for L{a3s_gateway.router.table}: route order, entrypoint filtering and rule errors.
"""

from __future__ import annotations

from random import Random
from typing import Dict, List, Optional, Sequence, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import RouterConfig
from a3s_gateway.router.rule import RequestFacts, RuleError
from a3s_gateway.router.table import InvalidRule, Route, RouteTable


def _facts(path: bytes = b"/", host: Optional[bytes] = b"example.com") -> RequestFacts:
    return RequestFacts(
        method=b"GET", host=host, path=path, query=b"", headers=Headers(), client_ip="10.0.0.1"
    )


def _router(
    name: str,
    rule: str,
    priority: int = 0,
    entrypoints: Sequence[str] = (),
    service: str = "backend",
) -> RouterConfig:
    return RouterConfig(
        name=name,
        rule=rule,
        service=service,
        entrypoints=tuple(entrypoints),
        priority=priority,
    )


def _table(*routers: RouterConfig) -> RouteTable:
    return RouteTable.from_config({router.name: router for router in routers})


def _matched(table: RouteTable, entrypoint: str, facts: RequestFacts) -> Optional[str]:
    route = table.match(entrypoint, facts)
    return None if route is None else route.name


def _names(routes: Sequence[Route]) -> List[str]:
    return [route.name for route in routes]


class RouteTests(SynchronousTestCase):
    def test_from_config(self) -> None:
        """
        A route carries its router's settings, with the rule compiled and the entrypoints as a
        set.
        """
        config = RouterConfig(
            name="api",
            rule="PathPrefix(`/api`)",
            service="backend",
            entrypoints=("web", "websecure", "web"),
            middlewares=("auth", "cors"),
            priority=-3,
        )
        route = Route.from_config("api", config)
        self.assertEqual(
            (route.name, route.rule, route.service, route.entrypoints, route.middlewares),
            (
                "api",
                "PathPrefix(`/api`)",
                "backend",
                frozenset({"web", "websecure"}),
                ("auth", "cors"),
            ),
        )
        self.assertEqual(route.priority, -3)
        self.assertTrue(route.matcher.matches(_facts(path=b"/api/x")))
        self.assertFalse(route.matcher.matches(_facts(path=b"/other")))

    def test_invalid_rule(self) -> None:
        """
        A rule that does not parse raises C{InvalidRule}, naming the router and the rule, and
        carrying the C{RuleError}.
        """
        config = _router("api", "Host(`a`) || ")
        error = self.assertRaises(InvalidRule, Route.from_config, "api", config)
        self.assertEqual((error.router, error.rule), ("api", "Host(`a`) || "))
        self.assertIsInstance(error.error, RuleError)
        self.assertEqual(
            str(error),
            "Router 'api': invalid rule 'Host(`a`) || ': Unexpected end of rule at position 13",
        )
        self.assertIs(error.__cause__, error.error)


class OrderTests(SynchronousTestCase):
    def test_lower_priority_first(self) -> None:
        """
        A lower priority number is tried first, negative numbers included, whatever the
        rules' lengths.
        """
        table = _table(
            _router("zero", "PathPrefix(`/a-very-long-prefix`)"),
            _router("high", "PathPrefix(`/`)", priority=10),
            _router("negative", "Path(`/`)", priority=-5),
            _router("one", "PathPrefix(`/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa`)", priority=1),
        )
        self.assertEqual(_names(table.routes), ["negative", "zero", "one", "high"])

    def test_longer_rule_first_on_ties(self) -> None:
        """
        Among equal priorities the longer rule (the more specific, as in Traefik) is tried
        first.
        """
        table = _table(
            _router("short", "PathPrefix(`/`)"),
            _router("long", "PathPrefix(`/api/v1`)"),
            _router("medium", "PathPrefix(`/api`)"),
        )
        self.assertEqual(_names(table.routes), ["long", "medium", "short"])
        self.assertEqual(_matched(table, "web", _facts(path=b"/api/v1/x")), "long")
        self.assertEqual(_matched(table, "web", _facts(path=b"/api/v2")), "medium")
        self.assertEqual(_matched(table, "web", _facts(path=b"/x")), "short")

    def test_length_counts_utf8_bytes(self) -> None:
        """
        Rule length is counted in UTF-8 bytes, as Traefik counts it.
        """
        accented = "Path(`/éé`)"  # 11 characters, 13 bytes
        plain = "Path(`/abcd`)"  # 13 characters, 13 bytes
        longer = "Path(`/abcde`)"  # 14 characters, 14 bytes
        shorter = "Path(`/abc`)"  # 12 characters, 12 bytes
        table = _table(
            _router("d-shorter", shorter),
            _router("c-accented", accented),
            _router("b-longer", longer),
            _router("a-plain", plain),
        )
        self.assertEqual(_names(table.routes), ["b-longer", "a-plain", "c-accented", "d-shorter"])

    def test_name_breaks_remaining_ties(self) -> None:
        """
        Equal priority and equal rule length: the router names decide, in ascending order.
        """
        table = _table(
            _router("b", "PathPrefix(`/`)"),
            _router("c", "PathPrefix(`/`)"),
            _router("a", "PathPrefix(`/`)"),
        )
        self.assertEqual(_names(table.routes), ["a", "b", "c"])
        self.assertEqual(_matched(table, "web", _facts()), "a")

    def test_first_match_wins(self) -> None:
        """
        C{match} returns the first route in order whose rule matches, or None.
        """
        table = _table(
            _router("api", "PathPrefix(`/api`)", priority=1),
            _router("admin", "PathPrefix(`/admin`)", priority=2),
            _router("fallback", "PathPrefix(`/`)", priority=3),
            _router("other-host", "Host(`other.test`)", priority=0),
        )
        self.assertEqual(_matched(table, "web", _facts(path=b"/api")), "api")
        self.assertEqual(_matched(table, "web", _facts(path=b"/admin")), "admin")
        self.assertEqual(_matched(table, "web", _facts(path=b"/x")), "fallback")
        self.assertEqual(_matched(table, "web", _facts(host=b"other.test:80")), "other-host")
        self.assertIsNone(_table(_router("api", "Path(`/api`)")).match("web", _facts()))

    def test_empty(self) -> None:
        """
        A table without routes matches nothing.
        """
        table = RouteTable.from_config({})
        self.assertEqual(table.routes, ())
        self.assertIsNone(table.match("web", _facts()))

    def test_mapping_key_is_the_name(self) -> None:
        """
        Routers are named by their key in the mapping.
        """
        table = RouteTable.from_config({"api": _router("api", "Path(`/`)")})
        self.assertEqual(_names(table.routes), ["api"])

    def test_duplicate_names(self) -> None:
        """
        Two routes with one name would make the order ambiguous, so they are refused.
        """
        route = Route.from_config("api", _router("api", "Path(`/`)"))
        other = Route.from_config("api", _router("api", "Path(`/x`)"))
        error = self.assertRaises(ValueError, RouteTable, [route, other])
        self.assertEqual(str(error), "Duplicate route names: api")


class EntrypointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = _table(
            _router("secure-only", "PathPrefix(`/`)", entrypoints=["websecure"], priority=-1),
            _router("both", "PathPrefix(`/both`)", entrypoints=["web", "websecure"]),
            _router("everywhere", "PathPrefix(`/`)", priority=1),
        )

    def test_restricted_route_skipped_elsewhere(self) -> None:
        """
        A router that lists entrypoints is only considered for requests on those entrypoints.
        """
        self.assertEqual(_matched(self.table, "websecure", _facts()), "secure-only")
        self.assertEqual(_matched(self.table, "web", _facts()), "everywhere")
        self.assertEqual(_matched(self.table, "web", _facts(path=b"/both")), "both")
        self.assertEqual(_matched(self.table, "admin", _facts(path=b"/both")), "everywhere")

    def test_routes_for(self) -> None:
        """
        C{routes_for} lists, in order, the routes an entrypoint may use: those that list it and
        those that list none.
        """
        self.assertEqual(
            _names(self.table.routes_for("websecure")), ["secure-only", "both", "everywhere"]
        )
        self.assertEqual(_names(self.table.routes_for("web")), ["both", "everywhere"])
        self.assertEqual(_names(self.table.routes_for("unknown")), ["everywhere"])

    def test_routes_for_cached(self) -> None:
        """
        The list for an entrypoint is computed once and reused.
        """
        self.assertIs(self.table.routes_for("web"), self.table.routes_for("web"))
        self.assertIs(self.table.routes_for("a"), self.table.routes_for("b"))

    def test_all_restricted(self) -> None:
        """
        When every router lists entrypoints, another entrypoint has no routes at all.
        """
        table = _table(_router("api", "PathPrefix(`/`)", entrypoints=["web"]))
        self.assertEqual(table.routes_for("other"), ())
        self.assertIsNone(table.match("other", _facts()))


class InvalidRuleTests(SynchronousTestCase):
    def test_first_bad_rule_in_mapping_order(self) -> None:
        """
        C{from_config} reports the first bad rule in the mapping's order.
        """
        good = _router("good", "Path(`/`)")
        bad_one = _router("bad-one", "Nope(`x`)")
        bad_two = _router("bad-two", "Path(`/`")
        error = self.assertRaises(
            InvalidRule,
            RouteTable.from_config,
            {"good": good, "bad-two": bad_two, "bad-one": bad_one},
        )
        self.assertEqual(
            str(error),
            "Router 'bad-two': invalid rule 'Path(`/`': "
            "Invalid matcher syntax, expected ')': Path(`/` at position 8",
        )
        error = self.assertRaises(
            InvalidRule,
            RouteTable.from_config,
            {"bad-one": bad_one, "good": good, "bad-two": bad_two},
        )
        self.assertEqual(
            str(error),
            "Router 'bad-one': invalid rule 'Nope(`x`)': Unknown matcher: Nope at position 0",
        )


_RULES = [
    "PathPrefix(`/`)",
    "Path(`/`)",
    "Host(`a.test`)",
    "Host(`b.test`)",
    "PathPrefix(`/api`)",
    "Host(`a.test`) && PathPrefix(`/api`)",
    "Method(`GET`) || Method(`HEAD`)",
    "Path(`/é`)",
]


class OrderPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.dictionaries(
            st.text(min_size=1, max_size=4),
            st.tuples(st.integers(-2, 2), st.sampled_from(_RULES)),
            max_size=12,
        ),
        st.randoms(use_true_random=False),
    )
    def test_order_is_total_and_independent_of_input_order(
        self, spec: Dict[str, Tuple[int, str]], random: Random
    ) -> None:
        """
        Whatever order the routers come in, the table's order is the same, and it is strictly
        increasing in (priority, longer rule first, name): a total order.
        """
        routers = {name: _router(name, rule, priority) for name, (priority, rule) in spec.items()}
        shuffled_names = list(routers)
        random.shuffle(shuffled_names)
        shuffled = {name: routers[name] for name in shuffled_names}
        first = RouteTable.from_config(routers).routes
        second = RouteTable.from_config(shuffled).routes
        self.assertEqual(_names(first), _names(second))
        self.assertEqual(sorted(_names(first)), sorted(spec))
        keys = [(route.priority, -len(route.rule.encode("utf-8")), route.name) for route in first]
        self.assertTrue(all(a < b for a, b in zip(keys, keys[1:])), keys)
