# -*- test-case-name: tests.test_gateway -*-
"""
The gateway as a Twisted service: a L{Gateway} owns the entrypoints (listening sockets and their
sites), the services' health checkers and the upstream pool, starts them together and drains
them together.

Embedders add a L{Gateway} to their own service tree; C{twistd -n a3s-gateway} and the
C{a3s-gateway} command build one through L{a3s_gateway.tap}.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Dict, List, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from a3s_gateway.config import parse_address
from a3s_gateway.config.schema import EntrypointConfig, GatewayConfig, TlsConfig
from a3s_gateway.proxy.headers import TrustedProxies, parse_networks
from a3s_gateway.proxy.resource import EntrypointResource
from a3s_gateway.proxy.site import GatewaySite
from a3s_gateway.proxy.upstream import UpstreamPool
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.registry import ServiceRegistry


def _interface(host: str) -> str:
    """
    The IP literal to bind for an entrypoint host: ``""`` (all IPv4 interfaces) for ``:port``,
    the address itself for IP literals, and the first address a host name resolves to.
    """
    if not host:
        return ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    return host


def _tls_options(tls: TlsConfig) -> Any:
    """
    The server TLS options of a ``tls { }`` block: the first key of C{key_file}, the chain of
    C{cert_file}, TLS 1.2 and up (1.3 only with C{min_version = "1.3"}).
    """
    from OpenSSL import crypto
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    with open(tls.cert_file, "rb") as f:
        chain_pem = f.read()
    with open(tls.key_file, "rb") as f:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
    marker = b"-----END CERTIFICATE-----"
    certificates = [
        crypto.load_certificate(crypto.FILETYPE_PEM, block + marker)
        for block in chain_pem.split(marker)
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    minimum = TLSVersion.TLSv1_3 if tls.min_version == "1.3" else TLSVersion.TLSv1_2
    return CertificateOptions(
        privateKey=key,
        certificate=certificates[0],
        extraCertChain=certificates[1:],
        raiseMinimumTo=minimum,
    )


def server_endpoint(reactor: Any, entrypoint: EntrypointConfig) -> IStreamServerEndpoint:
    """
    The listening endpoint of an entrypoint's address (and TLS block).
    """
    host, port = parse_address(entrypoint.address)
    interface = _interface(host)
    if entrypoint.tls is not None:
        return SSL4ServerEndpoint(
            reactor, port, _tls_options(entrypoint.tls), backlog=1024, interface=interface
        )
    if ":" in interface:
        return TCP6ServerEndpoint(reactor, port, backlog=1024, interface=interface)
    return TCP4ServerEndpoint(reactor, port, backlog=1024, interface=interface)


class Gateway(MultiService):
    """
    The whole gateway for one configuration.

    @param config: the validated configuration.
    @param reactor: the reactor to listen, connect and time with.
    @param agent: the agent for health-check probes (a non-persistent Agent by default).
    @ivar sites: the site of each HTTP entrypoint, by name.
    @ivar ports: the listening ports by entrypoint name, once started.
    """

    _log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any, agent: Optional[IAgent] = None) -> None:
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.routes = RouteTable.from_config(config.routers)
        if agent is None:
            agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.registry = ServiceRegistry.from_config(config, reactor, agent)
        for checker in self.registry.health_checkers:
            checker.setServiceParent(self)
        self.pool = UpstreamPool(reactor)
        self.sites: Dict[str, GatewaySite] = {}
        self.ports: Dict[str, IListeningPort] = {}
        for name, entrypoint in config.entrypoints.items():
            if entrypoint.protocol != "http":
                continue
            resource = EntrypointResource(
                name,
                self.routes,
                self.registry.services,
                self.pool,
                TrustedProxies(parse_networks(entrypoint.forwarded_headers.trusted_ips)),
                secure=entrypoint.tls is not None,
            )
            self.sites[name] = GatewaySite(resource, reactor, entrypoint.max_request_body_bytes)

    def privilegedStartService(self) -> None:
        """
        Bind every entrypoint before privileges are dropped; a bind error aborts the start.
        """
        for name, site in self.sites.items():
            endpoint = server_endpoint(self.reactor, self.config.entrypoints[name])
            failures: List[Any] = []
            d = endpoint.listen(site)
            d.addCallbacks(lambda port, name=name: self.ports.__setitem__(name, port), failures.append)
            if failures:
                failures[0].raiseException()
            if name not in self.ports:
                raise RuntimeError(f"entrypoint '{name}' did not bind synchronously")
            self._log.info(
                "Entrypoint {name} listening on {address}",
                name=name,
                address=self.config.entrypoints[name].address,
            )
        MultiService.privilegedStartService(self)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Drain: stop accepting, let in-flight requests and streams finish up to
        C{shutdown_timeout_secs}, then abort what is left and close pooled connections.
        """
        yield defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in self.ports.values()]
        )
        self.ports.clear()
        drained = defer.gatherResults([site.drain() for site in self.sites.values()])
        deadline = self.reactor.callLater(self.config.shutdown_timeout_secs, self._abort)
        yield drained
        if deadline.active():
            deadline.cancel()
        yield MultiService.stopService(self)
        yield self.pool.close_idle()

    def _abort(self) -> None:
        self._log.warn("Drain deadline passed; aborting the remaining connections")
        for site in self.sites.values():
            site.abort_all()
