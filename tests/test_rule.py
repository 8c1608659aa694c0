"""
Tests for L{a3s_gateway.router.rule}: the rule language, its matchers and its errors.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote_plus

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from a3s_gateway.router.rule import Matcher, RequestFacts, RuleError, parse_rule


def _facts(
    method: bytes = b"GET",
    host: Optional[bytes] = b"example.com",
    path: bytes = b"/",
    query: bytes = b"",
    headers: Sequence[Tuple[bytes, bytes]] = (),
    client_ip: str = "192.0.2.1",
) -> RequestFacts:
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    return RequestFacts(
        method=method, host=host, path=path, query=query, headers=raw, client_ip=client_ip
    )


def _matches(rule: str, facts: RequestFacts) -> bool:
    return parse_rule(rule).matches(facts)


# A rule that matches every request and one that matches none of those built by _facts().
_TRUE = "PathPrefix(``)"
_FALSE = "Path(`/never`)"


class RequestFactsTests(SynchronousTestCase):
    def test_hostname_strips_port_and_lowercases(self) -> None:
        """
        The hostname is the Host header without its port, lower-cased.
        """
        self.assertEqual(_facts(host=b"Example.COM:8080").hostname(), b"example.com")
        self.assertEqual(_facts(host=b"example.com").hostname(), b"example.com")
        self.assertEqual(_facts(host=b"example.com:").hostname(), b"example.com")

    def test_hostname_ipv6(self) -> None:
        """
        A bracketed IPv6 Host loses its brackets and port; a bare IPv6 address is kept whole.
        """
        self.assertEqual(_facts(host=b"[::1]:8080").hostname(), b"::1")
        self.assertEqual(_facts(host=b"[2001:DB8::1]").hostname(), b"2001:db8::1")
        self.assertEqual(_facts(host=b"2001:db8::1").hostname(), b"2001:db8::1")

    def test_hostname_none(self) -> None:
        """
        A request without a Host has no hostname.
        """
        self.assertIsNone(_facts(host=None).hostname())

    def test_query_params(self) -> None:
        """
        Query parameters are percent-decoded, C{+} is a space, blank values and repeats are
        kept, and raw non-ASCII bytes survive unchanged.
        """
        facts = _facts(query=b"a=1&a=x+y&b&c=&d=%C3%A9&e=\xff%2B")
        self.assertEqual(
            facts.query_params(),
            {
                b"a": [b"1", b"x y"],
                b"b": [b""],
                b"c": [b""],
                b"d": [b"\xc3\xa9"],
                b"e": [b"\xff+"],
            },
        )

    def test_query_params_parsed_once(self) -> None:
        """
        The query string is parsed at most once per request: later calls return the same
        mapping.
        """
        facts = _facts(query=b"a=1")
        self.assertIs(facts.query_params(), facts.query_params())

    def test_query_params_empty(self) -> None:
        """
        An empty query string has no parameters.
        """
        self.assertEqual(_facts(query=b"").query_params(), {})

    def test_client_address(self) -> None:
        """
        The client address is parsed; an IPv4-mapped IPv6 address stands for its IPv4 address;
        something that is not an IP address gives None.
        """
        self.assertEqual(
            _facts(client_ip="10.0.0.1").client_address(), ipaddress.ip_address("10.0.0.1")
        )
        self.assertEqual(
            _facts(client_ip="::ffff:10.0.0.1").client_address(),
            ipaddress.ip_address("10.0.0.1"),
        )
        self.assertEqual(_facts(client_ip="::1").client_address(), ipaddress.ip_address("::1"))
        self.assertIsNone(_facts(client_ip="unix:/tmp/socket").client_address())

    def test_equality_ignores_caches(self) -> None:
        """
        Two facts about the same request are equal whether or not their derived views have
        been computed.
        """
        headers = Headers()
        first = RequestFacts(b"GET", b"a:1", b"/", b"q=1", headers, "10.0.0.1")
        second = RequestFacts(b"GET", b"a:1", b"/", b"q=1", headers, "10.0.0.1")
        first.hostname()
        first.query_params()
        first.client_address()
        self.assertEqual(first, second)


class HostTests(SynchronousTestCase):
    def test_exact(self) -> None:
        """
        C{Host} matches the request's host and nothing else.
        """
        self.assertTrue(_matches("Host(`example.com`)", _facts(host=b"example.com")))
        self.assertFalse(_matches("Host(`example.com`)", _facts(host=b"other.com")))
        self.assertFalse(_matches("Host(`example.com`)", _facts(host=b"www.example.com")))
        self.assertFalse(_matches("Host(`example.com`)", _facts(host=b"example.co")))

    def test_port_ignored(self) -> None:
        """
        The port of the request's Host does not matter.
        """
        self.assertTrue(_matches("Host(`example.com`)", _facts(host=b"example.com:8080")))

    def test_case_insensitive(self) -> None:
        """
        Host names compare case-insensitively, on both sides.
        """
        self.assertTrue(_matches("Host(`Example.COM`)", _facts(host=b"EXAMPLE.com:80")))

    def test_no_host(self) -> None:
        """
        A request without a Host header never matches C{Host}.
        """
        self.assertFalse(_matches("Host(`example.com`)", _facts(host=None)))

    def test_ipv6(self) -> None:
        """
        An IPv6 host matches with or without brackets and port, written either way in the
        rule.
        """
        for rule in ["Host(`::1`)", "Host(`[::1]`)"]:
            for host in [b"[::1]:8080", b"[::1]", b"::1"]:
                self.assertTrue(_matches(rule, _facts(host=host)), (rule, host))
            self.assertFalse(_matches(rule, _facts(host=b"[::2]:8080")), rule)

    def test_with_port(self) -> None:
        """
        A C{Host} written with a port (as rules for the reference had to be) matches that host
        on that port only.
        """
        rule = "Host(`Example.com:8080`)"
        self.assertTrue(_matches(rule, _facts(host=b"example.COM:8080")))
        self.assertFalse(_matches(rule, _facts(host=b"example.com:8081")))
        self.assertFalse(_matches(rule, _facts(host=b"example.com")))
        self.assertFalse(_matches(rule, _facts(host=None)))
        self.assertTrue(_matches("Host(`[::1]:80`)", _facts(host=b"[::1]:80")))
        self.assertFalse(_matches("Host(`[::1]:80`)", _facts(host=b"[::1]:81")))


class HostRegexpTests(SynchronousTestCase):
    def test_unanchored_search(self) -> None:
        """
        C{HostRegexp} searches: unanchored patterns match anywhere in the host.
        """
        self.assertTrue(_matches("HostRegexp(`example`)", _facts(host=b"www.example.com")))
        self.assertFalse(_matches("HostRegexp(`^example`)", _facts(host=b"www.example.com")))

    def test_anchored_against_host_without_port(self) -> None:
        """
        The subject is the host without its port, so C{$} anchors at the end of the name.
        """
        rule = r"HostRegexp(`^[a-z]+\.example\.com$`)"
        self.assertTrue(_matches(rule, _facts(host=b"api.example.com:8443")))
        self.assertFalse(_matches(rule, _facts(host=b"api.example.com.evil:8443")))

    def test_case_insensitive(self) -> None:
        """
        C{HostRegexp} ignores case.
        """
        self.assertTrue(_matches("HostRegexp(`^API\\.`)", _facts(host=b"api.example.com")))
        self.assertTrue(_matches("HostRegexp(`^api\\.`)", _facts(host=b"API.example.com")))

    def test_no_host(self) -> None:
        """
        A request without a Host header never matches, even a pattern that matches anything.
        """
        self.assertFalse(_matches("HostRegexp(`.*`)", _facts(host=None)))


class PathTests(SynchronousTestCase):
    def test_path(self) -> None:
        """
        C{Path} is exact, case-sensitive equality on the raw, still-encoded path.
        """
        self.assertTrue(_matches("Path(`/api`)", _facts(path=b"/api")))
        self.assertFalse(_matches("Path(`/api`)", _facts(path=b"/api/")))
        self.assertFalse(_matches("Path(`/api`)", _facts(path=b"/API")))
        self.assertTrue(_matches("Path(`/a%20b`)", _facts(path=b"/a%20b")))
        self.assertFalse(_matches("Path(`/a b`)", _facts(path=b"/a%20b")))

    def test_path_prefix(self) -> None:
        """
        C{PathPrefix} is a plain string prefix, so C{/api} also matches C{/apiary}.
        """
        self.assertTrue(_matches("PathPrefix(`/api`)", _facts(path=b"/api")))
        self.assertTrue(_matches("PathPrefix(`/api`)", _facts(path=b"/api/v1")))
        self.assertTrue(_matches("PathPrefix(`/api`)", _facts(path=b"/apiary")))
        self.assertFalse(_matches("PathPrefix(`/api`)", _facts(path=b"/ap")))
        self.assertFalse(_matches("PathPrefix(`/api`)", _facts(path=b"/API")))

    def test_empty_path_prefix(self) -> None:
        """
        An empty C{PathPrefix} matches every path.
        """
        self.assertTrue(_matches("PathPrefix(``)", _facts(path=b"/")))
        self.assertTrue(_matches("PathPrefix(``)", _facts(path=b"*")))

    def test_path_regexp(self) -> None:
        """
        C{PathRegexp} searches the raw path, case-sensitively.
        """
        self.assertTrue(_matches(r"PathRegexp(`^/api/v\d+/`)", _facts(path=b"/api/v2/x")))
        self.assertFalse(_matches(r"PathRegexp(`^/api/v\d+/`)", _facts(path=b"/api/vx/x")))
        self.assertTrue(_matches("PathRegexp(`users`)", _facts(path=b"/v1/users/3")))
        self.assertFalse(_matches("PathRegexp(`users`)", _facts(path=b"/v1/USERS/3")))
        self.assertTrue(_matches("PathRegexp(`%2F`)", _facts(path=b"/a%2Fb")))

    def test_path_regexp_non_ascii(self) -> None:
        """
        A pattern with non-ASCII characters means characters, not UTF-8 bytes, and a non-ASCII
        subject is matched as text too.
        """
        self.assertTrue(_matches("PathRegexp(`^/é+$`)", _facts(path="/éé".encode())))
        self.assertTrue(_matches("PathRegexp(`^/[éa]$`)", _facts(path="/é".encode())))
        self.assertFalse(_matches("PathRegexp(`^/[éa]$`)", _facts(path=b"/\xc3")))
        self.assertTrue(_matches("PathRegexp(`^/.$`)", _facts(path="/é".encode())))
        self.assertTrue(_matches(r"PathRegexp(`^/\u00e9$`)", _facts(path="/é".encode())))


class MethodTests(SynchronousTestCase):
    def test_method(self) -> None:
        """
        C{Method} compares case-insensitively.
        """
        self.assertTrue(_matches("Method(`GET`)", _facts(method=b"GET")))
        self.assertTrue(_matches("Method(`get`)", _facts(method=b"GET")))
        self.assertTrue(_matches("Method(`POST`)", _facts(method=b"post")))
        self.assertFalse(_matches("Method(`GET`)", _facts(method=b"HEAD")))


class HeaderTests(SynchronousTestCase):
    def test_header_and_headers(self) -> None:
        """
        C{Header} and its v2 spelling C{Headers} match when any value of the header equals the
        argument exactly; the name is case-insensitive, the value is not.
        """
        headers = [(b"X-Key", b"first"), (b"x-key", b"second")]
        for name in ["Header", "Headers"]:
            self.assertTrue(_matches(f"{name}(`X-Key`, `first`)", _facts(headers=headers)))
            self.assertTrue(_matches(f"{name}(`x-KEY`, `second`)", _facts(headers=headers)))
            self.assertFalse(_matches(f"{name}(`X-Key`, `Second`)", _facts(headers=headers)))
            self.assertFalse(_matches(f"{name}(`X-Key`, `sec`)", _facts(headers=headers)))
            self.assertFalse(_matches(f"{name}(`X-Other`, `first`)", _facts(headers=headers)))

    def test_empty_value(self) -> None:
        """
        An empty argument matches a header that is present with an empty value only.
        """
        self.assertTrue(_matches("Header(`X-Key`, ``)", _facts(headers=[(b"X-Key", b"")])))
        self.assertFalse(_matches("Header(`X-Key`, ``)", _facts(headers=[])))

    def test_header_regexp(self) -> None:
        """
        C{HeaderRegexp} and C{HeadersRegexp} match when the pattern is found in any value.
        """
        headers = [(b"Accept", b"text/html"), (b"Accept", b"application/json")]
        for name in ["HeaderRegexp", "HeadersRegexp"]:
            self.assertTrue(_matches(f"{name}(`accept`, `json$`)", _facts(headers=headers)))
            self.assertTrue(_matches(f"{name}(`Accept`, `^text/`)", _facts(headers=headers)))
            self.assertFalse(_matches(f"{name}(`Accept`, `^json`)", _facts(headers=headers)))
            self.assertFalse(_matches(f"{name}(`X-None`, `.*`)", _facts(headers=headers)))


class QueryTests(SynchronousTestCase):
    def test_query(self) -> None:
        """
        C{Query} matches when any decoded value of the parameter equals the argument.
        """
        query = b"q=a+b&tag=x&tag=%C3%A9&flag&empty="
        facts = _facts(query=query)
        self.assertTrue(_matches("Query(`q`, `a b`)", facts))
        self.assertTrue(_matches("Query(`tag`, `x`)", facts))
        self.assertTrue(_matches("Query(`tag`, `é`)", facts))
        self.assertTrue(_matches("Query(`flag`, ``)", facts))
        self.assertTrue(_matches("Query(`empty`, ``)", facts))
        self.assertFalse(_matches("Query(`q`, `a+b`)", facts))
        self.assertFalse(_matches("Query(`tag`, `y`)", facts))
        self.assertFalse(_matches("Query(`missing`, ``)", facts))
        self.assertFalse(_matches("Query(`Q`, `a b`)", facts))

    def test_encoded_key(self) -> None:
        """
        Parameter names are percent-decoded too.
        """
        self.assertTrue(_matches("Query(`a b`, `1`)", _facts(query=b"a%20b=1")))
        self.assertTrue(_matches("Query(`clé`, `1`)", _facts(query=b"cl%C3%A9=1")))

    def test_query_regexp(self) -> None:
        """
        C{QueryRegexp} matches when the pattern is found in any decoded value.
        """
        facts = _facts(query=b"v=1&v=beta-2")
        self.assertTrue(_matches(r"QueryRegexp(`v`, `^beta-\d$`)", facts))
        self.assertTrue(_matches("QueryRegexp(`v`, `1`)", facts))
        self.assertFalse(_matches("QueryRegexp(`v`, `^2`)", facts))
        self.assertFalse(_matches("QueryRegexp(`w`, ``)", facts))

    def test_no_query(self) -> None:
        """
        Without a query string no parameter is present.
        """
        self.assertFalse(_matches("Query(`q`, ``)", _facts(query=b"")))


class ClientIPTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """
        C{ClientIP} takes one address or one CIDR network.
        """
        self.assertTrue(_matches("ClientIP(`10.0.0.1`)", _facts(client_ip="10.0.0.1")))
        self.assertFalse(_matches("ClientIP(`10.0.0.1`)", _facts(client_ip="10.0.0.2")))
        self.assertTrue(_matches("ClientIP(`10.0.0.0/8`)", _facts(client_ip="10.200.0.1")))
        self.assertFalse(_matches("ClientIP(`10.0.0.0/8`)", _facts(client_ip="11.0.0.1")))

    def test_host_bits_allowed(self) -> None:
        """
        A network written with host bits set means the network that contains it.
        """
        self.assertTrue(_matches("ClientIP(`10.1.2.3/16`)", _facts(client_ip="10.1.9.9")))

    def test_ipv6(self) -> None:
        """
        IPv6 addresses and networks work the same way.
        """
        self.assertTrue(_matches("ClientIP(`2001:db8::/32`)", _facts(client_ip="2001:db8::5")))
        self.assertFalse(_matches("ClientIP(`2001:db8::/32`)", _facts(client_ip="2001:db9::")))
        self.assertTrue(_matches("ClientIP(`::1`)", _facts(client_ip="::1")))

    def test_ipv4_mapped_client(self) -> None:
        """
        An IPv4-mapped IPv6 client address (a dual-stack socket) matches IPv4 networks.
        """
        self.assertTrue(_matches("ClientIP(`10.0.0.0/8`)", _facts(client_ip="::ffff:10.0.0.1")))
        self.assertFalse(_matches("ClientIP(`10.0.0.0/8`)", _facts(client_ip="::ffff:11.0.0.1")))

    def test_ipv4_mapped_network(self) -> None:
        """
        An IPv4-mapped IPv6 network matches IPv4 clients, mapped or not.
        """
        rule = "ClientIP(`::ffff:10.0.0.0/104`)"
        self.assertTrue(_matches(rule, _facts(client_ip="10.0.0.1")))
        self.assertTrue(_matches(rule, _facts(client_ip="::ffff:10.0.0.1")))
        self.assertFalse(_matches(rule, _facts(client_ip="11.0.0.1")))

    def test_families_do_not_mix(self) -> None:
        """
        An IPv4 client is not inside an IPv6 network that is not IPv4-mapped, even C{::/0}.
        """
        self.assertFalse(_matches("ClientIP(`::/0`)", _facts(client_ip="10.0.0.1")))
        self.assertFalse(_matches("ClientIP(`0.0.0.0/0`)", _facts(client_ip="::1")))

    def test_not_an_address(self) -> None:
        """
        A client address that is not an IP address (a UNIX socket) matches no network.
        """
        self.assertFalse(_matches("ClientIP(`0.0.0.0/0`)", _facts(client_ip="unix")))
        self.assertTrue(_matches("!ClientIP(`0.0.0.0/0`)", _facts(client_ip="unix")))


class OperatorTests(SynchronousTestCase):
    def test_and(self) -> None:
        """
        C{&&} matches when both sides match.
        """
        facts = _facts()
        self.assertTrue(_matches(f"{_TRUE} && {_TRUE}", facts))
        self.assertFalse(_matches(f"{_TRUE} && {_FALSE}", facts))
        self.assertFalse(_matches(f"{_FALSE} && {_TRUE}", facts))
        self.assertTrue(_matches(f"{_TRUE} && {_TRUE} && {_TRUE}", facts))
        self.assertFalse(_matches(f"{_TRUE} && {_TRUE} && {_FALSE}", facts))

    def test_or(self) -> None:
        """
        C{||} matches when either side matches.
        """
        facts = _facts()
        self.assertTrue(_matches(f"{_FALSE} || {_TRUE}", facts))
        self.assertTrue(_matches(f"{_TRUE} || {_FALSE}", facts))
        self.assertFalse(_matches(f"{_FALSE} || {_FALSE}", facts))
        self.assertTrue(_matches(f"{_FALSE} || {_FALSE} || {_TRUE}", facts))

    def test_not(self) -> None:
        """
        C{!} negates; a run of them negates once per C{!}.
        """
        facts = _facts()
        self.assertFalse(_matches(f"!{_TRUE}", facts))
        self.assertTrue(_matches(f"!{_FALSE}", facts))
        self.assertTrue(_matches(f"!!{_TRUE}", facts))
        self.assertFalse(_matches(f"! ! !{_TRUE}", facts))

    def test_and_binds_tighter_than_or(self) -> None:
        """
        C{a || b && c} is C{a || (b && c)} and C{a && b || c} is C{(a && b) || c}.
        """
        facts = _facts()
        self.assertTrue(_matches(f"{_TRUE} || {_FALSE} && {_FALSE}", facts))
        self.assertTrue(_matches(f"{_FALSE} && {_FALSE} || {_TRUE}", facts))
        self.assertFalse(_matches(f"{_FALSE} || {_TRUE} && {_FALSE}", facts))

    def test_not_binds_tightest(self) -> None:
        """
        C{!a && b} is C{(!a) && b} and C{!a || b} is C{(!a) || b}.
        """
        facts = _facts()
        self.assertFalse(_matches(f"!{_FALSE} && {_FALSE}", facts))
        self.assertTrue(_matches(f"!{_TRUE} || {_TRUE}", facts))

    def test_parentheses(self) -> None:
        """
        Parentheses group, overriding precedence, and may nest and be redundant.
        """
        facts = _facts()
        self.assertFalse(_matches(f"({_TRUE} || {_FALSE}) && {_FALSE}", facts))
        self.assertFalse(_matches(f"!({_TRUE} || {_TRUE})", facts))
        self.assertTrue(_matches(f"!({_FALSE} && {_TRUE})", facts))
        self.assertTrue(_matches(f"((({_TRUE})))", facts))
        self.assertTrue(_matches(f"(({_FALSE}) || ({_TRUE} && ({_TRUE})))", facts))

    def test_realistic(self) -> None:
        """
        A realistic rule mixing every operator routes as a reader would expect.
        """
        rule = (
            "Host(`api.example.com`) && (PathPrefix(`/v1`) || PathPrefix(`/v2`)) "
            "&& !Method(`DELETE`)"
        )
        self.assertTrue(_matches(rule, _facts(host=b"api.example.com", path=b"/v2/x")))
        self.assertFalse(_matches(rule, _facts(host=b"api.example.com", path=b"/v3/x")))
        self.assertFalse(
            _matches(rule, _facts(host=b"api.example.com", path=b"/v1", method=b"DELETE"))
        )
        self.assertFalse(_matches(rule, _facts(host=b"www.example.com", path=b"/v1")))

    def test_deep_negation(self) -> None:
        """
        Any number of C{!} in a row parses without nesting.
        """
        self.assertTrue(_matches("!" * 10000 + _TRUE, _facts()))
        self.assertFalse(_matches("!" * 10001 + _TRUE, _facts()))


class SyntaxTests(SynchronousTestCase):
    def test_whitespace_between_tokens(self) -> None:
        """
        Spaces, tabs and newlines may separate any two tokens, including a name and its C{(}.
        """
        facts = _facts(headers=[(b"X-Key", b"v")])
        for rule in [
            "Host (`example.com`)",
            "Host(\t`example.com`\n)",
            "\n  Host(`example.com`)&&Path(`/`)\r\n",
            "Headers( `X-Key` ,`v` )",
            "( Host(`example.com`) ||Path(`/x`) )&&! Method (`POST`)",
        ]:
            self.assertTrue(_matches(rule, facts), rule)

    def test_double_quotes(self) -> None:
        """
        Arguments may be in double quotes, mixed with backticks in one call.
        """
        facts = _facts(headers=[(b"X-Key", b"v")])
        self.assertTrue(_matches('Host("example.com")', facts))
        self.assertTrue(_matches('Headers("X-Key", `v`)', facts))
        self.assertTrue(_matches('Headers(`X-Key`, "v")', facts))

    def test_double_quote_escapes(self) -> None:
        """
        In double quotes C{\\"} and C{\\\\} are escapes; any other backslash is kept, so regular
        expressions read the same in both quoting styles.
        """
        self.assertTrue(
            _matches(r'Header(`X`, "say \"hi\"")', _facts(headers=[(b"X", b'say "hi"')]))
        )
        self.assertTrue(_matches(r'Path("/a\\b")', _facts(path=b"/a\\b")))
        self.assertTrue(_matches(r'PathRegexp("^/a\.b$")', _facts(path=b"/a.b")))
        self.assertFalse(_matches(r'PathRegexp("^/a\.b$")', _facts(path=b"/axb")))
        self.assertTrue(_matches(r'PathRegexp("^/a\\.b$")', _facts(path=b"/a.b")))

    def test_backticks_are_raw(self) -> None:
        """
        Backticks take everything up to the next backtick as it is: quotes and backslashes.
        """
        self.assertTrue(_matches(r"Header(`X`, `\"q\"`)", _facts(headers=[(b"X", b'\\"q\\"')])))

    def test_operators_inside_arguments(self) -> None:
        """
        C{&&}, C{||}, parentheses and commas inside a quoted argument belong to the argument.
        """
        facts = _facts(headers=[(b"X", b"a && b || (c, d)")])
        self.assertTrue(_matches("Header(`X`, `a && b || (c, d)`)", facts))
        self.assertTrue(_matches('Header(`X`, "a && b || (c, d)") && Path(`/`)', facts))
        self.assertTrue(_matches("Path(`/a&&b`)", _facts(path=b"/a&&b")))

    def test_result_is_a_matcher(self) -> None:
        """
        C{parse_rule} returns an object with C{matches}, which answers a C{bool}.
        """
        matcher: Matcher = parse_rule("Host(`example.com`)")
        self.assertIs(matcher.matches(_facts()), True)
        self.assertIs(parse_rule(f"{_TRUE} && !{_TRUE}").matches(_facts()), False)


class ErrorTests(SynchronousTestCase):
    def assertRuleError(self, rule: str, message: str, position: int) -> None:
        error = self.assertRaises(RuleError, parse_rule, rule)
        self.assertEqual((error.message, error.position), (message, position), rule)
        self.assertEqual(str(error), f"{message} at position {position}")

    def test_is_value_error(self) -> None:
        """
        C{RuleError} is a C{ValueError} and its string names the position.
        """
        error = RuleError("Empty rule", 0)
        self.assertIsInstance(error, ValueError)
        self.assertEqual(str(error), "Empty rule at position 0")

    def test_unknown_matcher(self) -> None:
        """
        An unknown or wrongly-cased matcher name is reported where it starts.
        """
        self.assertRuleError("Foo(`a`)", "Unknown matcher: Foo", 0)
        self.assertRuleError("Host(`a`) && host(`b`)", "Unknown matcher: host", 13)
        self.assertRuleError("HostSNI(`a`)", "Unknown matcher: HostSNI", 0)
        self.assertRuleError("Foo `x", "Unknown matcher: Foo", 0)

    def test_argument_count(self) -> None:
        """
        Every matcher takes exactly its number of arguments; the error points at its name.
        """
        self.assertRuleError("Host(`a`, `b`)", "Host() expects 1 argument, got 2", 0)
        self.assertRuleError("Path()", "Path() expects 1 argument, got 0", 0)
        self.assertRuleError("Method(`GET`, `POST`)", "Method() expects 1 argument, got 2", 0)
        self.assertRuleError("Headers(`X-Key`)", "Headers() expects 2 arguments, got 1", 0)
        self.assertRuleError(
            "Path(`/`) && Query(`a`, `b`, `c`)", "Query() expects 2 arguments, got 3", 13
        )
        self.assertRuleError(" ClientIP()", "ClientIP() expects 1 argument, got 0", 1)

    def test_unterminated(self) -> None:
        """
        An argument without its closing quote is reported at its opening quote.
        """
        self.assertRuleError("Host(`x", "Unterminated backtick argument", 5)
        self.assertRuleError('Host("x', "Unterminated quoted argument", 5)
        self.assertRuleError(r'Host("x\")', "Unterminated quoted argument", 5)

    def test_bare_argument(self) -> None:
        """
        An argument that is not quoted (or quoted with single quotes) is reported with its
        first character.
        """
        self.assertRuleError("Host(example.com)", "Expected backtick or '\"', got 'e'", 5)
        self.assertRuleError("Host('a')", "Expected backtick or '\"', got '''", 5)
        self.assertRuleError("Host(,`a`)", "Expected backtick or '\"', got ','", 5)
        self.assertRuleError("Host(`a`,)", "Expected backtick or '\"', got ')'", 9)

    def test_expected_open_parenthesis(self) -> None:
        """
        A matcher name without C{(} is reported with the text read so far.
        """
        self.assertRuleError("Host", "Invalid matcher syntax, expected '(': Host", 4)
        self.assertRuleError(
            "Host && Path(`/`)", "Invalid matcher syntax, expected '(': Host &&", 5
        )

    def test_expected_close_parenthesis(self) -> None:
        """
        Arguments not followed by C{)} (or a comma) are reported with the text read so far.
        """
        self.assertRuleError("Host(`x`", "Invalid matcher syntax, expected ')': Host(`x`", 8)
        self.assertRuleError("Host(", "Invalid matcher syntax, expected ')': Host(", 5)
        self.assertRuleError(
            "Host(`a` `b`)", "Invalid matcher syntax, expected ')': Host(`a` `b`", 9
        )

    def test_unexpected_token(self) -> None:
        """
        An operator, parenthesis or argument where it cannot be is reported; so is anything
        after a complete rule.
        """
        self.assertRuleError("|| Host(`a`)", "Unexpected token '||'", 0)
        self.assertRuleError("Host(`a`) && || Path(`/`)", "Unexpected token '||'", 13)
        self.assertRuleError("Host(`a`) Path(`/`)", "Unexpected token 'Path'", 10)
        self.assertRuleError("Host(`a`) Host(`b", "Unexpected token 'Host'", 10)
        self.assertRuleError("Host(`a`)) ", "Unexpected token ')'", 9)
        self.assertRuleError("Host(`a`) & Path(`/`)", "Unexpected token '&'", 10)
        self.assertRuleError("Host(`a`) | Path(`/`)", "Unexpected token '|'", 10)
        self.assertRuleError("()", "Unexpected token ')'", 1)
        self.assertRuleError("`a`", "Unexpected token '`a`'", 0)
        self.assertRuleError("(Host(`a`) Path(`b`))", "Unexpected token 'Path'", 11)

    def test_unexpected_end(self) -> None:
        """
        A rule that stops where an operand is needed is reported at its end.
        """
        self.assertRuleError("Host(`a`) && ", "Unexpected end of rule", 13)
        self.assertRuleError("Host(`a`) ||", "Unexpected end of rule", 12)
        self.assertRuleError("!", "Unexpected end of rule", 1)
        self.assertRuleError("(", "Unexpected end of rule", 1)

    def test_unclosed_parenthesis(self) -> None:
        """
        A group that is never closed is reported at its C{(}.
        """
        self.assertRuleError("(Host(`a`)", "Unclosed '('", 0)
        self.assertRuleError("Path(`/`) && ((Host(`a`))", "Unclosed '('", 13)

    def test_empty(self) -> None:
        """
        An empty or blank rule is an error.
        """
        self.assertRuleError("", "Empty rule", 0)
        self.assertRuleError(" \t\n", "Empty rule", 0)

    def test_invalid_regular_expression(self) -> None:
        """
        A pattern that does not compile is reported at its argument, with Python's reason.
        """
        self.assertRuleError(
            "PathRegexp(`(`)",
            "Invalid regular expression '(': missing ), unterminated subpattern",
            11,
        )
        self.assertRuleError(
            "HostRegexp(`[`)", "Invalid regular expression '[': unterminated character set", 11
        )
        self.assertRuleError(
            "HeaderRegexp(`X`, `a{99999999999}`)",
            "Invalid regular expression 'a{99999999999}': the repetition number is too large",
            18,
        )
        self.assertRuleError(
            'QueryRegexp(`q`, "*")',
            "Invalid regular expression '*': nothing to repeat",
            17,
        )

    def test_invalid_network(self) -> None:
        """
        A C{ClientIP} argument that is neither an address nor a CIDR network is reported.
        """
        self.assertRuleError("ClientIP(`10.0.0.300`)", "Invalid IP or CIDR '10.0.0.300'", 9)
        self.assertRuleError("ClientIP(`10.0.0.0/33`)", "Invalid IP or CIDR '10.0.0.0/33'", 9)
        self.assertRuleError("ClientIP(` 10.0.0.1`)", "Invalid IP or CIDR ' 10.0.0.1'", 9)

    def test_invalid_header_name(self) -> None:
        """
        A header name that is not an HTTP token could never match, so it is reported.
        """
        self.assertRuleError("Header(`X Key`, `v`)", "Invalid header name 'X Key'", 7)
        self.assertRuleError("HeadersRegexp(``, `v`)", "Invalid header name ''", 14)

    def test_nesting_limit(self) -> None:
        """
        Absurdly deep parentheses are an error, not a crash.
        """
        rule = "(" * 1000 + _TRUE + ")" * 1000
        self.assertRuleError(rule, "Rule nested too deeply", 50)
        self.assertTrue(_matches("(" * 50 + _TRUE + ")" * 50, _facts()))


# Property tests: random rule trees, rendered to text in random styles, parsed and evaluated
# against a straightforward reference reading of the rule on random requests.


@attr.s(frozen=True, auto_attribs=True)
class _Leaf:
    name: str
    args: Tuple[str, ...]


@attr.s(frozen=True, auto_attribs=True)
class _NotNode:
    child: _Node


@attr.s(frozen=True, auto_attribs=True)
class _AndNode:
    children: Tuple[_Node, ...]


@attr.s(frozen=True, auto_attribs=True)
class _OrNode:
    children: Tuple[_Node, ...]


_Node = Union[_Leaf, _NotNode, _AndNode, _OrNode]


@attr.s(frozen=True, auto_attribs=True)
class _Request:
    method: str
    host: Optional[str]
    path: str
    query: Tuple[Tuple[str, str, bool], ...]  # key, value, sent raw (unencoded)
    headers: Tuple[Tuple[str, str], ...]
    client_ip: str

    def facts(self) -> RequestFacts:
        items = []
        for key, value, raw in self.query:
            if raw:
                items.append(f"{key}={value}" if value else key)
            else:
                items.append(f"{quote_plus(key)}={quote_plus(value)}")
        return _facts(
            method=self.method.encode(),
            host=None if self.host is None else self.host.encode(),
            path=self.path.encode(),
            query="&".join(items).encode(),
            headers=[(name.encode(), value.encode()) for name, value in self.headers],
            client_ip=self.client_ip,
        )


_HOSTS = ["example.com", "EXAMPLE.com", "other.test", "::1", "[::1]", "example.com:8080"]
_REQUEST_HOSTS = [
    None,
    "example.com",
    "Example.COM:8080",
    "example.com:8080",
    "other.test",
    "[::1]:443",
    "::1",
]
_PATHS = ["/", "/api", "/api/v1", "/apiary", "/a%20b", "/é"]
_PREFIXES = ["", "/api", "/ap", "/other", "/é"]
_PATH_PATTERNS = ["^/api", "v1$", "%20", "^/$", "^/.$", "é", "^/[a-z]+$"]
_HOST_PATTERNS = [r"^example\.com$", "example", "^OTHER", "^$", "com$", "^::1$"]
_METHODS = ["GET", "get", "POST", "Put"]
_HEADER_NAMES = ["X-Key", "x-key", "Accept"]
_HEADER_VALUES = ["secret", "Secret", "a && b", 'q"uote', "back\\slash", "", "é", "(a, b) || c"]
_VALUE_PATTERNS = ["^sec", "ret$", "&&", "^$", "é", r"\\", '"', r"^\w+$"]
_QUERY_KEYS = ["q", "k", "é", "a b"]
_QUERY_VALUES = ["1", "a b", "", "é", "x&&y", "+"]
_NETWORKS = [
    "10.0.0.1",
    "10.0.0.0/8",
    "192.168.0.0/16",
    "::1",
    "2001:db8::/32",
    "::ffff:10.0.0.0/104",
]
_CLIENT_IPS = ["10.0.0.1", "10.1.2.3", "192.168.1.1", "::1", "::ffff:10.0.0.1", "2001:db8::5"]

_ARGUMENTS: Dict[str, List[List[str]]] = {
    "Host": [_HOSTS],
    "HostRegexp": [_HOST_PATTERNS],
    "Path": [_PATHS],
    "PathPrefix": [_PREFIXES],
    "PathRegexp": [_PATH_PATTERNS],
    "Method": [_METHODS],
    "Header": [_HEADER_NAMES, _HEADER_VALUES],
    "Headers": [_HEADER_NAMES, _HEADER_VALUES],
    "HeaderRegexp": [_HEADER_NAMES, _VALUE_PATTERNS],
    "HeadersRegexp": [_HEADER_NAMES, _VALUE_PATTERNS],
    "Query": [_QUERY_KEYS, _QUERY_VALUES],
    "QueryRegexp": [_QUERY_KEYS, _VALUE_PATTERNS],
    "ClientIP": [_NETWORKS],
}


def _leaf_strategy(name: str, pools: List[List[str]]) -> st.SearchStrategy[_Leaf]:
    return st.tuples(*(st.sampled_from(pool) for pool in pools)).map(lambda args: _Leaf(name, args))


_leaves = st.one_of([_leaf_strategy(name, pools) for name, pools in _ARGUMENTS.items()])


def _extend(children: st.SearchStrategy[_Node]) -> st.SearchStrategy[_Node]:
    operands = st.lists(children, min_size=2, max_size=3).map(tuple)
    return st.one_of(children.map(_NotNode), operands.map(_AndNode), operands.map(_OrNode))


_trees: st.SearchStrategy[_Node] = st.recursive(_leaves, _extend, max_leaves=8)

_requests = st.builds(
    _Request,
    method=st.sampled_from(_METHODS),
    host=st.sampled_from(_REQUEST_HOSTS),
    path=st.sampled_from(_PATHS),
    query=st.lists(
        st.tuples(st.sampled_from(_QUERY_KEYS), st.sampled_from(_QUERY_VALUES), st.booleans()),
        max_size=3,
    ).map(
        # Only values without query syntax can travel unencoded.
        lambda pairs: tuple(
            (key, value, raw and key == "é" and value in {"é", "1", ""})
            for key, value, raw in pairs
        )
    ),
    headers=st.lists(
        st.tuples(st.sampled_from(_HEADER_NAMES), st.sampled_from(_HEADER_VALUES)), max_size=3
    ).map(tuple),
    client_ip=st.sampled_from(_CLIENT_IPS),
)


def _strip_port(host: str) -> str:
    bracketed = re.match(r"^\[(.*)\](:\d*)?$", host)
    if bracketed:
        return bracketed.group(1)
    return host.split(":")[0] if host.count(":") == 1 else host


def _network_contains(network_text: str, client_text: str) -> bool:
    # Independent of the implementation's approach: compare in IPv6 form when the network
    # is IPv6 and the client is (or stands for) an IPv4 address.
    network = ipaddress.ip_network(network_text, strict=False)
    client = ipaddress.ip_address(client_text)
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        client = client.ipv4_mapped
    if network.version == client.version:
        return client in network
    if network.version == 6 and network.prefixlen >= 96:
        return ipaddress.IPv6Address(f"::ffff:{client}") in network
    return False


def _leaf_expected(leaf: _Leaf, request: _Request) -> bool:
    name, args = leaf.name, leaf.args
    header_values = [v for n, v in request.headers if n.lower() == args[0].lower()]
    query_values = [v for k, v, _ in request.query if k == args[0]]
    if name == "Host":
        if request.host is None:
            return False
        host = args[0].lower()
        if re.search(r":\d+$", host) and (host.count(":") == 1 or host.startswith("[")):
            return request.host.lower() == host
        return _strip_port(request.host).lower() == host.strip("[]")
    if name == "HostRegexp":
        if request.host is None:
            return False
        return re.search(args[0], _strip_port(request.host).lower(), re.IGNORECASE) is not None
    if name == "Path":
        return request.path == args[0]
    if name == "PathPrefix":
        return request.path.startswith(args[0])
    if name == "PathRegexp":
        return re.search(args[0], request.path) is not None
    if name == "Method":
        return request.method.upper() == args[0].upper()
    if name in {"Header", "Headers"}:
        return args[1] in header_values
    if name in {"HeaderRegexp", "HeadersRegexp"}:
        return any(re.search(args[1], value) for value in header_values)
    if name == "Query":
        return args[1] in query_values
    if name == "QueryRegexp":
        return any(re.search(args[1], value) for value in query_values)
    assert name == "ClientIP", name
    return _network_contains(args[0], request.client_ip)


def _expected(node: _Node, request: _Request) -> bool:
    if isinstance(node, _Leaf):
        return _leaf_expected(node, request)
    if isinstance(node, _NotNode):
        return not _expected(node.child, request)
    if isinstance(node, _AndNode):
        return all(_expected(child, request) for child in node.children)
    return any(_expected(child, request) for child in node.children)


_SPACE = st.sampled_from(["", " ", "  ", "\t", "\n", " \r\n "])


def _render(node: _Node, data: st.DataObject, binding: int = 0) -> str:
    """
    The text of C{node} with random quoting and spacing, parenthesised where its parent's
    C{binding} needs it (0: anywhere, 1: operand of C{||}, 2: of C{&&}, 3: of C{!}) and at
    random elsewhere.
    """

    def space() -> str:
        return data.draw(_SPACE)

    if isinstance(node, _Leaf):
        args = []
        for arg in node.args:
            if data.draw(st.booleans()):
                quoted = f"`{arg}`"
            else:
                quoted = '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
            args.append(space() + quoted + space())
        text, strength = f"{node.name}{space()}({','.join(args)})", 4
    elif isinstance(node, _NotNode):
        text, strength = "!" + space() + _render(node.child, data, 3), 3
    else:
        operator, strength = ("&&", 2) if isinstance(node, _AndNode) else ("||", 1)
        parts = [_render(child, data, strength) for child in node.children]
        text = (space() + operator + space()).join(parts)
    if strength < binding or data.draw(st.integers(0, 5)) == 0:
        text = "(" + space() + text + space() + ")"
    return text


_FRAGMENTS = [
    "Host",
    "Path",
    "PathPrefix",
    "PathRegexp",
    "Headers",
    "Query",
    "ClientIP",
    "Nope",
    "(",
    ")",
    ",",
    " ",
    "\t",
    "!",
    "&&",
    "||",
    "&",
    "|",
    "`",
    '"',
    "\\",
    "'",
    "`a`",
    "`/`",
    "``",
    '"x"',
    "`[`",
    "`(`",
    "`10.0.0.0/8`",
    "`::1`",
    "`X-Key`",
    "`a b`",
]


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_trees, st.lists(_requests, min_size=1, max_size=4), st.data())
    def test_parsed_rule_agrees_with_reference(
        self, tree: _Node, requests: List[_Request], data: st.DataObject
    ) -> None:
        """
        Any rule tree, rendered with any quoting, spacing and redundant parentheses, parses
        to a matcher that answers like a direct reading of the tree, also when asked twice
        about the same request (the cached views do not change the answer).
        """
        text = _render(tree, data)
        matcher = parse_rule(text)
        for request in requests:
            facts = request.facts()
            expected = _expected(tree, request)
            self.assertEqual(matcher.matches(facts), expected, (text, request))
            self.assertEqual(matcher.matches(facts), expected, (text, request))

    def _check_parse(self, text: str) -> None:
        try:
            matcher = parse_rule(text)
        except RuleError as error:
            self.assertTrue(0 <= error.position <= len(text), (text, error.position))
            self.assertEqual(str(error), f"{error.message} at position {error.position}")
        else:
            self.assertIn(
                matcher.matches(_facts(query=b"a=1", headers=[(b"X", b"y")])), {True, False}
            )

    @settings(max_examples=500, deadline=None)
    @given(st.text())
    def test_arbitrary_text(self, text: str) -> None:
        """
        Parsing any text either gives a working matcher or raises C{RuleError} with a position
        inside the text; nothing else escapes.
        """
        self._check_parse(text)

    @settings(max_examples=1000, deadline=None)
    @given(st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=2), max_size=20).map("".join))
    def test_rule_like_text(self, text: str) -> None:
        """
        Near-miss rules assembled from rule fragments parse or raise C{RuleError}, and nothing
        else.
        """
        self._check_parse(text)
