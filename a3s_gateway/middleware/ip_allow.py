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

from typing import Sequence, cast

from a3s_gateway.addresses import Networks, parse_address
from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    RequestContext,
    RequestResult,
    json_reply,
)

_FORBIDDEN = json_reply(403, "Forbidden")


class IpAllow(Middleware):
    """
    Refuses every client whose address is outside the allowed networks.
    """

    def __init__(self, name: str, networks: Networks) -> None:
        super().__init__(name)
        self.networks = networks

    def allows(self, text: str) -> bool:
        """
        Whether the client address C{text} is inside one of the allowed networks.
        """
        return self.networks.contains(parse_address(text))

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
    return IpAllow(config.name, Networks.parse(entries))
