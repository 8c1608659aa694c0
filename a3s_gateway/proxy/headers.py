# -*- test-case-name: tests.test_headers -*-
"""
Header rules of the proxy: hop-by-hop filtering in both directions, the client's address and the
``X-Forwarded-*`` headers.

These run on every proxied request, so they work on the raw ``(name, values)`` pairs Twisted keeps
and allocate one list per direction.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import attr
from twisted.web.http_headers import Headers

from a3s_gateway.addresses import Networks, parse_address

RawHeaders = List[Tuple[bytes, bytes]]

# RFC 9110 section 7.6.1 plus the de-facto ones; Content-Length is not hop-by-hop but the upstream
# client frames the body itself, so a client's value must never be forwarded next to its own.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {b"content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_RESPONSE_KEEP_LENGTH_DROP = HOP_BY_HOP
# Rewritten by the gateway on every forwarded request.
_FORWARDED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)


_COMMON_CONNECTION = {
    b"keep-alive": frozenset({b"keep-alive"}),
    b"close": frozenset({b"close"}),
}


def connection_tokens(values: Optional[Sequence[bytes]]) -> frozenset[bytes]:
    """
    The lower-cased header names listed in ``Connection`` header values, which are hop-by-hop too.
    """
    if not values:
        return frozenset()
    if len(values) == 1:
        # What nearly every Connection header says, on every request and response.
        common = _COMMON_CONNECTION.get(values[0].lower())
        if common is not None:
            return common
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


@attr.s(frozen=True, auto_attribs=True)
class TrustedProxies:
    """
    The peers whose ``X-Forwarded-*`` headers are believed (an entrypoint's
    ``forwarded_headers { trusted_ips }``). Empty means nobody is trusted.
    """

    networks: Networks = Networks()

    def trusts(self, ip: str) -> bool:
        """
        Whether the address C{ip} is inside one of the trusted networks.
        """
        return bool(self.networks) and self.networks.contains(parse_address(ip))

    def client_ip(self, peer: str, forwarded_for: Optional[Sequence[bytes]]) -> str:
        """
        "The client's address": the peer, or, when the peer is trusted, the last untrusted address
        of ``X-Forwarded-For`` (walking from the right, past every trusted hop).
        """
        if not forwarded_for or not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(b",")]
        client = peer
        for hop in reversed(hops):
            text = hop.decode("latin-1")
            if parse_address(text) is None:
                break
            client = text
            if not self.trusts(text):
                break
        return client


def forward_request_headers(
    raw: Iterable[Tuple[bytes, Sequence[bytes]]],
    peer: str,
    client_ip: str,
    trusted: bool,
    scheme: bytes,
) -> RawHeaders:
    """
    Build the header list sent upstream from the client's raw headers.

    Hop-by-hop headers (and those named in ``Connection``) are dropped, repeated headers and
    ``Host`` are kept, and ``X-Forwarded-For``/``-Proto``/``-Host`` and ``X-Real-IP`` are set. From
    a trusted peer its ``X-Forwarded-*`` values are kept and the peer appended to
    ``X-Forwarded-For``; from anyone else they are replaced.

    @param raw: C{Headers.getAllRawHeaders()} of the client's request.
    @param peer: the TCP peer's address.
    @param client_ip: the client's address as resolved by L{TrustedProxies.client_ip}.
    @param trusted: whether C{peer} is a trusted proxy.
    @param scheme: C{b"http"} or C{b"https"}, the entrypoint's scheme.
    """
    pairs = raw if isinstance(raw, list) else list(raw)
    drop = _REQUEST_DROP
    for name, values in pairs:
        if name.lower() == b"connection":
            drop = _REQUEST_DROP | connection_tokens(values)
            break
    out: RawHeaders = []
    host: Optional[bytes] = None
    xff: List[bytes] = []
    proto: Optional[bytes] = None
    fhost: Optional[bytes] = None
    for name, values in pairs:
        lower = name.lower()
        if lower in drop:
            continue
        if lower in _FORWARDED:
            if trusted:
                if lower == b"x-forwarded-for":
                    xff.extend(values)
                elif lower == b"x-forwarded-proto":
                    proto = values[-1]
                elif lower == b"x-forwarded-host":
                    fhost = values[-1]
            continue
        if lower == b"host":
            host = values[0]
        for value in values:
            out.append((name, value))
    peer_bytes = peer.encode("ascii")
    xff.append(peer_bytes)
    out.append((b"X-Forwarded-For", b", ".join(xff)))
    out.append((b"X-Forwarded-Proto", proto or scheme))
    if fhost is not None or host is not None:
        out.append((b"X-Forwarded-Host", fhost if fhost is not None else host))  # type: ignore[arg-type]
    out.append((b"X-Real-IP", client_ip.encode("ascii")))
    return out


def response_headers(raw: Sequence[Tuple[bytes, bytes]], keep_length: bool) -> RawHeaders:
    """
    Filter an upstream response's raw header list for the client: hop-by-hop headers and those
    named in ``Connection`` go; repeated headers stay in order.

    @param keep_length: keep ``Content-Length`` (for a response that has no body of its own, such
        as the answer to HEAD, whose length describes the resource).
    """
    # One pass on every response; a second only when Connection names other headers (rare).
    drop = _RESPONSE_KEEP_LENGTH_DROP if keep_length else _RESPONSE_DROP
    kept = []
    named = []
    for name, value in raw:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                named.append(value)
        else:
            kept.append((name, value))
    if named:
        extra = connection_tokens(named) - _RESPONSE_DROP
        if extra:
            kept = [(name, value) for name, value in kept if name.lower() not in extra]
    return kept


def canonical_name(name: bytes) -> bytes:
    """
    C{name} capitalised as twisted.web's L{Headers} stores and writes it (``X-Ratelimit-Limit``
    for ``x-ratelimit-limit``), for L{set_all_checked}.
    """
    headers = Headers()
    headers.setRawHeaders(name, [b""])
    return next(headers.getAllRawHeaders())[0]


def set_all_checked(headers: Headers, pairs: Iterable[Tuple[bytes, bytes]]) -> None:
    """
    Replace headers exactly as C{headers.setRawHeaders(name, [value])} would for each
    C{(name, value)} of C{pairs}, in order, for names already made canonical by
    L{canonical_name} and values already known to hold no CR or LF.

    Middlewares set the same names on every request, with values checked when they are built
    (or digits): C{setRawHeaders} would canonicalise the name and scan the value for line breaks
    again each time, about a third of a microsecond per header.
    """
    raw = headers._rawHeaders
    for canonical, value in pairs:
        raw[canonical] = [value]


def get_raw(headers: Headers, canonical: bytes) -> Optional[List[bytes]]:
    """
    The values of a header, as C{headers.getRawHeaders(name)} returns them (None when there are
    none), for a name already made canonical by L{canonical_name}.

    For the headers read on every request: C{getRawHeaders} canonicalises the name each time,
    a method call and a cache lookup that cost as much as the lookup itself.
    """
    return headers._rawHeaders.get(canonical) or None


def add_checked(headers: Headers, canonical: bytes, value: bytes) -> None:
    """
    Add a header value exactly as C{headers.addRawHeader(name, value)} would, for a name already
    made canonical and a value already known to hold no CR or LF: the request headers, as the
    channel reads them (L{a3s_gateway.proxy.site.GatewayChannel}), which checked both already.
    """
    raw = headers._rawHeaders
    values = raw.get(canonical)
    if values is None:
        raw[canonical] = [value]
    else:
        values.append(value)


def add_vary(headers: Headers, token: bytes) -> None:
    """
    Add C{token} to the response's ``Vary`` unless it (or ``*``) is already listed; existing
    values are kept and joined into one header.
    """
    existing = headers.getRawHeaders(b"vary") or []
    listed = {item.strip().lower() for value in existing for item in value.split(b",")}
    if token.lower() in listed or b"*" in listed:
        return
    kept = [value for value in existing if value.strip()]
    headers.setRawHeaders(b"Vary", [b", ".join([*kept, token])])
