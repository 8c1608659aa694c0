# -*- test-case-name: tests.test_addresses -*-
"""
IP addresses and networks as the gateway compares them, for every place that matches a client
against a list (trusted proxies, ``ip-allow``, ``ClientIP()``, ``tcp_allowed_ips``).

An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack socket reports for an IPv4
peer) is compared as the IPv4 address it stands for, and so is a ``::ffff:a.b.c.d/n`` network;
an address is only tested against networks of its own family.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Tuple, Union

import attr

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_address(text: str) -> Optional[Address]:
    """
    C{text} as an address, an IPv4-mapped one as its IPv4 address; None when it is not an IP.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(entry: str) -> Network:
    """
    An IP (a one-address network) or a CIDR, host bits allowed; a network inside
    ``::ffff:0:0/96`` becomes the IPv4 network it stands for.

    @raise ValueError: for an entry that is neither.
    """
    network: Network = ipaddress.ip_network(entry, strict=False)
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= _MAPPED.prefixlen
        and network.subnet_of(_MAPPED)
    ):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - _MAPPED.prefixlen)
        )
    return network


@attr.s(frozen=True, auto_attribs=True)
class Networks:
    """
    A list of networks, kept apart by family, that answers whether an address is inside one.
    """

    v4: Tuple[ipaddress.IPv4Network, ...] = ()
    v6: Tuple[ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Networks:
        """
        Parse configured IPs and CIDRs (surrounding spaces allowed) with L{parse_network}.

        @raise ValueError: for an entry that is neither.
        """
        networks = [parse_network(entry.strip()) for entry in entries]
        return cls(
            tuple(n for n in networks if isinstance(n, ipaddress.IPv4Network)),
            tuple(n for n in networks if isinstance(n, ipaddress.IPv6Network)),
        )

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def contains(self, address: Optional[Address]) -> bool:
        """
        Whether C{address} (from L{parse_address}; None is never inside) is in a network.
        """
        if isinstance(address, ipaddress.IPv4Address):
            return any(address in network for network in self.v4)
        if isinstance(address, ipaddress.IPv6Address):
            return any(address in network for network in self.v6)
        return False
