"""
Tests for L{a3s_gateway.proxy.headers}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from a3s_gateway.addresses import Networks
from a3s_gateway.proxy.headers import (
    TrustedProxies,
    add_checked,
    add_vary,
    canonical_name,
    connection_tokens,
    forward_request_headers,
    response_headers,
    set_all_checked,
)


def _raw(*pairs: tuple[bytes, bytes]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def _names(pairs: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in pairs]


class ConnectionTokensTests(SynchronousTestCase):
    def test_tokens(self) -> None:
        """
        Every comma-separated token of every Connection value is returned lower-cased.
        """
        self.assertEqual(
            connection_tokens([b"Keep-Alive, X-Secret", b" close "]),
            frozenset({b"keep-alive", b"x-secret", b"close"}),
        )

    def test_single_common_values(self) -> None:
        """
        A lone keep-alive or close (any case) names just itself; anything around it is read as
        a list.
        """
        self.assertEqual(connection_tokens([b"Keep-Alive"]), frozenset({b"keep-alive"}))
        self.assertEqual(connection_tokens([b"CLOSE"]), frozenset({b"close"}))
        self.assertEqual(connection_tokens([b" close"]), frozenset({b"close"}))
        self.assertEqual(
            connection_tokens([b"close,X-Private"]), frozenset({b"close", b"x-private"})
        )

    def test_none(self) -> None:
        """
        No Connection header names nothing.
        """
        self.assertEqual(connection_tokens(None), frozenset())


class TrustedProxiesTests(SynchronousTestCase):
    def test_nobody_trusted_by_default(self) -> None:
        """
        With no trusted networks the client's address is always the peer.
        """
        proxies = TrustedProxies()
        self.assertFalse(proxies.trusts("10.0.0.1"))
        self.assertEqual(proxies.client_ip("10.0.0.1", [b"1.2.3.4"]), "10.0.0.1")

    def test_cidr_v4_v6(self) -> None:
        """
        IPv4 and IPv6 CIDRs and bare addresses are matched; IPv4-mapped IPv6 peers count as IPv4.
        """
        proxies = TrustedProxies(Networks.parse(["10.0.0.0/8", "::1", "2001:db8::/32"]))
        self.assertTrue(proxies.trusts("10.9.8.7"))
        self.assertTrue(proxies.trusts("::ffff:10.0.0.1"))
        self.assertTrue(proxies.trusts("::1"))
        self.assertTrue(proxies.trusts("2001:db8::5"))
        self.assertFalse(proxies.trusts("11.0.0.1"))
        self.assertFalse(proxies.trusts("not-an-ip"))

    def test_last_untrusted_hop(self) -> None:
        """
        Through a trusted peer, the client is the last X-Forwarded-For address that is not
        itself trusted, walking from the right.
        """
        proxies = TrustedProxies(Networks.parse(["10.0.0.0/8"]))
        self.assertEqual(
            proxies.client_ip("10.0.0.1", [b"6.6.6.6, 1.2.3.4", b"10.0.0.2"]), "1.2.3.4"
        )

    def test_forged_garbage(self) -> None:
        """
        A hop that is not an address stops the walk at the last good address.
        """
        proxies = TrustedProxies(Networks.parse(["10.0.0.0/8"]))
        self.assertEqual(proxies.client_ip("10.0.0.1", [b"<script>, 1.2.3.4"]), "1.2.3.4")
        self.assertEqual(proxies.client_ip("10.0.0.1", [b"1.2.3.4, junk"]), "10.0.0.1")

    def test_bad_network(self) -> None:
        """
        An entry that is neither an IP nor a CIDR is a ValueError.
        """
        self.assertRaises(ValueError, Networks.parse, ["10.0.0.0/33"])


class ForwardRequestHeadersTests(SynchronousTestCase):
    def test_hop_by_hop_removed(self) -> None:
        """
        The standard hop-by-hop headers, those named in Connection and Content-Length are not
        forwarded; Host and repeated end-to-end headers are, in order.
        """
        headers = _raw(
            (b"Host", b"example.com:8080"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Hop", b"secret"),
            (b"TE", b"trailers"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"5"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"Cookie", b"a=1"),
            (b"Cookie", b"b=2"),
        )
        out = forward_request_headers(
            headers.getAllRawHeaders(), "1.2.3.4", "1.2.3.4", False, b"http"
        )
        self.assertEqual(
            [pair for pair in out if not pair[0].lower().startswith(b"x-")],
            [(b"Host", b"example.com:8080"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")],
        )
        self.assertNotIn(b"x-hop", _names(out))

    def test_untrusted_forwarded_replaced(self) -> None:
        """
        X-Forwarded-* and X-Real-IP sent by an untrusted client are replaced by the gateway's own.
        """
        headers = _raw(
            (b"Host", b"api.example.com"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil.example"),
            (b"X-Real-IP", b"6.6.6.6"),
        )
        out = dict(
            forward_request_headers(
                headers.getAllRawHeaders(), "1.2.3.4", "1.2.3.4", False, b"http"
            )
        )
        self.assertEqual(out[b"X-Forwarded-For"], b"1.2.3.4")
        self.assertEqual(out[b"X-Forwarded-Proto"], b"http")
        self.assertEqual(out[b"X-Forwarded-Host"], b"api.example.com")
        self.assertEqual(out[b"X-Real-IP"], b"1.2.3.4")

    def test_trusted_forwarded_kept(self) -> None:
        """
        From a trusted proxy, its X-Forwarded-* values are kept and the peer is appended to
        X-Forwarded-For; X-Real-IP is the resolved client.
        """
        headers = _raw(
            (b"Host", b"internal"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"api.example.com"),
        )
        out = dict(
            forward_request_headers(
                headers.getAllRawHeaders(), "10.0.0.1", "1.2.3.4", True, b"http"
            )
        )
        self.assertEqual(out[b"X-Forwarded-For"], b"1.2.3.4, 10.0.0.1")
        self.assertEqual(out[b"X-Forwarded-Proto"], b"https")
        self.assertEqual(out[b"X-Forwarded-Host"], b"api.example.com")
        self.assertEqual(out[b"X-Real-IP"], b"1.2.3.4")

    def test_no_host(self) -> None:
        """
        Without a Host header no X-Forwarded-Host is invented.
        """
        out = forward_request_headers([], "1.2.3.4", "1.2.3.4", False, b"https")
        self.assertNotIn(b"x-forwarded-host", _names(out))
        self.assertIn((b"X-Forwarded-Proto", b"https"), out)


class ResponseHeadersTests(SynchronousTestCase):
    def test_filtered(self) -> None:
        """
        Hop-by-hop response headers, those named in Connection and framing headers are dropped;
        repeated Set-Cookie headers are kept in order.
        """
        raw = [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"X-Internal"),
            (b"X-Internal", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"10"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ]
        self.assertEqual(
            response_headers(raw, keep_length=False),
            [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
        )

    def test_named_before_connection(self) -> None:
        """
        A header named in ``Connection`` goes even when it comes before ``Connection``, in any
        case; close and keep-alive are only options.
        """
        raw = [
            (b"x-private", b"1"),
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"X-PRIVATE", b"2"),
            (b"Connection", b"close"),
        ]
        self.assertEqual(
            response_headers(raw, keep_length=False), [(b"Content-Type", b"text/plain")]
        )

    def test_keep_length(self) -> None:
        """
        For bodiless responses (HEAD, 304) the upstream's Content-Length is kept.
        """
        raw = [(b"Content-Length", b"10")]
        self.assertEqual(response_headers(raw, keep_length=True), raw)


class AddVaryTests(SynchronousTestCase):
    def test_add_vary(self) -> None:
        """
        L{add_vary} adds a token once, case-insensitively, joins repeated Vary headers, and
        leaves ``Vary: *`` alone.
        """
        headers = Headers()
        add_vary(headers, b"Origin")
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"Origin"])
        headers = Headers({b"Vary": [b"accept, origin"]})
        add_vary(headers, b"Origin")
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"accept, origin"])
        headers = Headers({b"Vary": [b"A", b"B"]})
        add_vary(headers, b"Origin")
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"A, B, Origin"])
        headers = Headers({b"Vary": [b"*"]})
        add_vary(headers, b"Origin")
        self.assertEqual(headers.getRawHeaders(b"vary"), [b"*"])


class CheckedHeadersTests(SynchronousTestCase):
    """
    The shortcuts for names and values checked beforehand store exactly what twisted.web's own
    methods store.
    """

    NAMES = [b"x-ratelimit-limit", b"X-Frame-Options", b"www-authenticate", b"ETAG", b"te"]

    def test_canonical_name(self) -> None:
        """
        L{canonical_name} capitalises as L{Headers} does, special cases included.
        """
        self.assertEqual(canonical_name(b"x-ratelimit-limit"), b"X-Ratelimit-Limit")
        self.assertEqual(canonical_name(b"www-authenticate"), b"WWW-Authenticate")

    def test_set_all_checked(self) -> None:
        """
        L{set_all_checked} replaces every value of each header as C{setRawHeaders} does, in
        order (a name given twice keeps its last value).
        """
        for name in self.NAMES:
            ours, theirs = _raw((name, b"old"), (b"Other", b"o")), _raw((name, b"old"))
            theirs.addRawHeader(b"Other", b"o")
            pairs = [(canonical_name(name), b"new"), (b"New-One", b"1"), (b"New-One", b"2")]
            set_all_checked(ours, pairs)
            for pair_name, value in pairs:
                theirs.setRawHeaders(pair_name, [value])
            self.assertEqual(list(ours.getAllRawHeaders()), list(theirs.getAllRawHeaders()))

    def test_add_checked(self) -> None:
        """
        L{add_checked} adds a value after those already there, as C{addRawHeader} does.
        """
        for name in self.NAMES:
            ours, theirs = Headers(), Headers()
            for value in (b"1", b"2"):
                add_checked(ours, canonical_name(name), value)
                theirs.addRawHeader(name, value)
            self.assertEqual(list(ours.getAllRawHeaders()), list(theirs.getAllRawHeaders()))
