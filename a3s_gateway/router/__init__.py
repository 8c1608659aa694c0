# -*- test-case-name: tests.test_rule,tests.test_table -*-
"""
Routing: the rule language (:mod:`a3s_gateway.router.rule`) and the route table
(:mod:`a3s_gateway.router.table`).

For the gateway, which compiles the configuration's routers into a :class:`RouteTable`, for
config validation, which reports a bad rule as :class:`InvalidRule`, and for the proxy, which
describes each request as :class:`RequestFacts` and asks the table for its :class:`Route`.
"""

from __future__ import annotations

from a3s_gateway.router.rule import Matcher, RequestFacts, RuleError, parse_rule
from a3s_gateway.router.table import InvalidRule, Route, RouteTable

__all__ = [
    "InvalidRule",
    "Matcher",
    "RequestFacts",
    "Route",
    "RouteTable",
    "RuleError",
    "parse_rule",
]
