# -*- test-case-name: tests.test_ip_allow -*-
"""
The ``ip-allow`` middleware (spec 1.12.13 with this project's fixes): only clients whose address
is in ``allowed_ips`` (single IPs and CIDRs, IPv4 and IPv6) get through; everyone else gets
``403 {"error":"Forbidden"}`` with ``Content-Type: application/json``.

Differences from the reference, on purpose:

 - the client's address is L{RequestFacts.client_ip}, which the proxy resolves through the
   entrypoint's ``forwarded_headers { trusted_ips }``: behind a trusted proxy the
   ``X-Forwarded-For`` client is checked, while a forged ``X-Forwarded-For`` from an untrusted
   peer changes nothing (the peer's own address is checked);
 - addresses are compared as addresses, not text: an IPv4-mapped IPv6 client address
   (``::ffff:10.1.2.3``, a dual-stack socket's view of an IPv4 peer) is the IPv4 address it
   stands for, and an IPv4-mapped entry (``::ffff:10.0.0.0/104``) allows the IPv4 network it
   stands for;
 - a client address that is not an IP address at all (a UNIX socket peer) is refused.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence, Tuple, Union, cast

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    RequestContext,
    RequestResult,
    json_reply,
)
from a3s_gateway.proxy.headers import Network, parse_networks

_FORBIDDEN = json_reply(403, "Forbidden")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _unmapped(network: Network) -> Network:
    """
    The IPv4 network an IPv4-mapped IPv6 network stands for; any other network as it is.
    """
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= _MAPPED.prefixlen
        and network.subnet_of(_MAPPED)
    ):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - _MAPPED.prefixlen))
    return network


def client_address(text: str) -> Optional[Address]:
    """
    C{text} as an address, an IPv4-mapped IPv6 address as its IPv4 address; None when C{text}
    is not an IP address.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class IpAllow(Middleware):
    """
    Refuses every client whose address is outside the allowed networks.
    """

    def __init__(self, name: str, networks: Iterable[Network]) -> None:
        super().__init__(name)
        unmapped = [_unmapped(network) for network in networks]
        # Kept apart by version so that an address is only ever tested against networks of its
        # own family.
        self._v4: Tuple[ipaddress.IPv4Network, ...] = tuple(
            n for n in unmapped if isinstance(n, ipaddress.IPv4Network)
        )
        self._v6: Tuple[ipaddress.IPv6Network, ...] = tuple(
            n for n in unmapped if isinstance(n, ipaddress.IPv6Network)
        )

    def allows(self, text: str) -> bool:
        """
        Whether the client address C{text} is inside one of the allowed networks.
        """
        address = client_address(text)
        if isinstance(address, ipaddress.IPv4Address):
            return any(address in network for network in self._v4)
        if isinstance(address, ipaddress.IPv6Address):
            return any(address in network for network in self._v6)
        return False

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Answer 403 unless the client's (proxy-resolved) address is allowed.
        """
        return None if self.allows(ctx.facts.client_ip) else _FORBIDDEN


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """
    An L{IpAllow} from the ``allowed_ips`` option (validated: non-empty, every entry an IP or a
    CIDR).
    """
    entries = cast(Sequence[str], config.options.get("allowed_ips", ()))
    return IpAllow(config.name, parse_networks(entries))
