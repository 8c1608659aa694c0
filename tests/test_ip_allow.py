"""
Tests for L{a3s_gateway.middleware.ip_allow}: the client's (proxy-resolved) address checked
against IPs and CIDRs of both families.
"""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.addresses import Networks
from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, Reply, RequestContext
from a3s_gateway.middleware.ip_allow import IpAllow, build
from a3s_gateway.router.rule import RequestFacts


def _ip_allow(*allowed: str) -> Middleware:
    ctx = BuildContext(reactor=Clock(), agent=RequestTraversalAgent(Resource()), router="r")
    options = {"allowed_ips": list(allowed)}
    return build(MiddlewareConfig(name="ips", type="ip-allow", options=options), ctx)


def _ctx(client_ip: str, forwarded_for: bytes = b"") -> RequestContext:
    headers = Headers()
    if forwarded_for:
        headers.addRawHeader(b"X-Forwarded-For", forwarded_for)
    facts = RequestFacts(
        method=b"GET", host=b"api", path=b"/", query=b"", headers=headers, client_ip=client_ip
    )
    return RequestContext(facts, headers, b"/", "r")


class IpAllowTests(SynchronousTestCase):
    """
    Allowing and refusing clients by address.
    """

    def assertForbidden(self, result: object) -> None:
        """
        C{result} is the 403 with a JSON Content-Type.
        """
        assert isinstance(result, Reply), result
        self.assertEqual(result.status, 403)
        self.assertEqual(dict(result.headers)[b"Content-Type"], b"application/json")
        self.assertEqual(result.body, b'{"error":"Forbidden"}')

    def test_single_ipv4(self) -> None:
        """
        A single IPv4 entry allows exactly that address.
        """
        middleware = _ip_allow("10.0.0.1")
        self.assertIsNone(middleware.on_request(_ctx("10.0.0.1")))
        self.assertForbidden(middleware.on_request(_ctx("10.0.0.2")))

    def test_ipv4_cidr(self) -> None:
        """
        A CIDR allows its whole network and nothing next to it.
        """
        middleware = _ip_allow("192.168.4.0/22")
        for allowed in ("192.168.4.0", "192.168.5.17", "192.168.7.255"):
            self.assertIsNone(middleware.on_request(_ctx(allowed)), allowed)
        for refused in ("192.168.3.255", "192.168.8.0", "10.0.0.1"):
            self.assertForbidden(middleware.on_request(_ctx(refused)))

    def test_non_strict_cidr(self) -> None:
        """
        A CIDR with host bits set (``10.1.2.3/8``) stands for its network.
        """
        middleware = _ip_allow("10.1.2.3/8")
        self.assertIsNone(middleware.on_request(_ctx("10.200.0.1")))

    def test_ipv6(self) -> None:
        """
        IPv6 addresses and CIDRs work, whatever the textual form of the client address.
        """
        middleware = _ip_allow("::1", "2001:db8::/32")
        self.assertIsNone(middleware.on_request(_ctx("::1")))
        self.assertIsNone(middleware.on_request(_ctx("0:0:0:0:0:0:0:1")))
        self.assertIsNone(middleware.on_request(_ctx("2001:db8:ffff::42")))
        self.assertIsNone(middleware.on_request(_ctx("2001:DB8::1")))
        self.assertForbidden(middleware.on_request(_ctx("2001:db9::1")))
        self.assertForbidden(middleware.on_request(_ctx("::2")))

    def test_scoped_ipv6(self) -> None:
        """
        A link-local client address with a zone is compared by its address.
        """
        middleware = _ip_allow("fe80::/10")
        self.assertIsNone(middleware.on_request(_ctx("fe80::1%eth0")))

    def test_ipv4_mapped_client(self) -> None:
        """
        An IPv4-mapped IPv6 client address (a dual-stack socket's view of an IPv4 peer) is
        compared as the IPv4 address.
        """
        middleware = _ip_allow("10.0.0.0/8")
        self.assertIsNone(middleware.on_request(_ctx("::ffff:10.1.2.3")))
        self.assertForbidden(middleware.on_request(_ctx("::ffff:11.1.2.3")))

    def test_ipv4_mapped_entry(self) -> None:
        """
        An IPv4-mapped IPv6 entry allows the IPv4 addresses it stands for.
        """
        middleware = _ip_allow("::ffff:10.0.0.0/104", "::ffff:192.0.2.7")
        self.assertIsNone(middleware.on_request(_ctx("10.9.9.9")))
        self.assertIsNone(middleware.on_request(_ctx("192.0.2.7")))
        self.assertIsNone(middleware.on_request(_ctx("::ffff:10.9.9.9")))
        self.assertForbidden(middleware.on_request(_ctx("11.0.0.1")))

    def test_families_kept_apart(self) -> None:
        """
        IPv4 addresses never match IPv6 networks and the other way round, even where the
        integers would (``0.0.0.1`` and ``::/96``).
        """
        self.assertForbidden(_ip_allow("::/96").on_request(_ctx("0.0.0.1")))
        self.assertForbidden(_ip_allow("0.0.0.0/0").on_request(_ctx("::1")))
        self.assertIsNone(_ip_allow("0.0.0.0/0").on_request(_ctx("203.0.113.9")))
        self.assertIsNone(_ip_allow("::/0").on_request(_ctx("2001:db8::1")))

    def test_not_an_address(self) -> None:
        """
        A client address that is not an IP address (a UNIX socket peer, garbage) is refused.
        """
        middleware = _ip_allow("0.0.0.0/0", "::/0")
        for text in ("", "unix", "/tmp/socket", "10.0.0.256", "1.2.3.4:80"):
            self.assertForbidden(middleware.on_request(_ctx(text)))

    def test_forwarded_for_ignored(self) -> None:
        """
        The middleware looks at the resolved client address only: an X-Forwarded-For header
        naming an allowed address does not help (the proxy resolves trusted ones into
        C{client_ip} before the middleware runs).
        """
        middleware = _ip_allow("10.0.0.1")
        self.assertForbidden(middleware.on_request(_ctx("203.0.113.5", b"10.0.0.1")))

    def test_allows(self) -> None:
        """
        L{IpAllow.allows} is the check behind the request phase.
        """
        middleware = IpAllow("ips", Networks.parse(["10.0.0.0/8"]))
        self.assertTrue(middleware.allows("10.1.1.1"))
        self.assertFalse(middleware.allows("11.1.1.1"))

    def test_body_is_json(self) -> None:
        """
        The 403 body parses as the reference's JSON.
        """
        result = _ip_allow("10.0.0.1").on_request(_ctx("10.0.0.2"))
        assert isinstance(result, Reply)
        self.assertEqual(json.loads(result.body), {"error": "Forbidden"})

    @given(st.text(max_size=60))
    def test_arbitrary_client_never_raises(self, text: str) -> None:
        """
        Whatever the client address text, the answer is None or the 403.
        """
        result = _ip_allow("10.0.0.0/8", "::1").on_request(_ctx(text))
        if result is not None:
            self.assertForbidden(result)

    @given(st.ip_addresses(v=4))
    def test_ipv4_property(self, address: ipaddress.IPv4Address) -> None:
        """
        An IPv4 address is allowed by ``10.0.0.0/8`` exactly when its first octet is 10, in
        both its plain and its IPv4-mapped forms.
        """
        middleware = _ip_allow("10.0.0.0/8")
        expected = address.packed[0] == 10
        for text in (str(address), f"::ffff:{address}"):
            self.assertEqual(middleware.on_request(_ctx(text)) is None, expected)
