# -*- test-case-name: tests.test_gateway_e2e -*-
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
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from a3s_gateway.addresses import Networks
from a3s_gateway.config import parse_address
from a3s_gateway.config.schema import EntrypointConfig, GatewayConfig, TlsConfig, TracingConfig
from a3s_gateway.middleware.base import BuildContext
from a3s_gateway.middleware.pipeline import EMPTY, Pipeline, build_middleware, build_pipelines
from a3s_gateway.observability.access_log import AccessLog, AccessLogError
from a3s_gateway.observability.admin import AdminResource
from a3s_gateway.observability.metrics import GatewayMetrics
from a3s_gateway.observability.tracing import Tracer
from a3s_gateway.proxy.headers import TrustedProxies
from a3s_gateway.proxy.resource import EntrypointResource
from a3s_gateway.proxy.site import GatewaySite
from a3s_gateway.proxy.tcp import TcpEntrypointFactory
from a3s_gateway.proxy.udp import UdpEntrypoint
from a3s_gateway.proxy.upstream import UpstreamPool
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.registry import ServiceRegistry
from a3s_gateway.transport import TCPServerEndpoint


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


class GatewayStartError(Exception):
    """
    An entrypoint could not be bound; its message names the address and the entrypoint.
    """


def _listen_now(endpoint: IStreamServerEndpoint, factory: Any) -> IListeningPort:
    """
    Listen on C{endpoint} and return the port at once; TCP and SSL server endpoints listen
    synchronously, so a bind error surfaces here and not later in a log.
    """
    ports: List[IListeningPort] = []
    failures: List[Any] = []
    endpoint.listen(factory).addCallbacks(ports.append, failures.append)
    if failures:
        failures[0].raiseException()
    return ports[0]


def server_endpoint(
    reactor: Any, entrypoint: EntrypointConfig, reuse_port: bool = False
) -> IStreamServerEndpoint:
    """
    The listening endpoint of an entrypoint's address (and TLS block); with C{reuse_port}, one
    that sets C{SO_REUSEPORT}, so that every worker process can bind the same port.
    """
    host, port = parse_address(entrypoint.address)
    tls = _tls_options(entrypoint.tls) if entrypoint.tls is not None else None
    return TCPServerEndpoint(
        reactor, port, _interface(host), backlog=1024, tls_options=tls, reuse_port=reuse_port
    )


class _Observability:
    """
    What the gateway shows operators, as configured: metrics and the admin API with the
    dashboard (with a ``dashboard { }`` block) and the access log (``access_log { }``), each
    costing nothing per request unless configured; and tracing, always on for ``traceparent``
    propagation as in the reference, which ``tracing { }`` extends with B3, sampling and export.

    @ivar metrics: the counters behind ``/metrics``, when the dashboard is served.
    @ivar admin: the admin API and dashboard resource, when configured.
    @ivar admin_pipeline: the dashboard's middlewares.
    @ivar access_log: the access-log service, when configured.
    @ivar tracer: the trace propagator (and exporter, with an ``otlp_endpoint``).
    """

    def __init__(self, gateway: Gateway, config: GatewayConfig, reactor: Any, agent: IAgent):
        self.metrics: Optional[GatewayMetrics] = None
        self.admin: Optional[AdminResource] = None
        self.admin_pipeline = EMPTY
        self._dashboard_entrypoint: Optional[str] = None
        if config.dashboard is not None:
            metrics = self.metrics = GatewayMetrics(gateway, reactor)
            self.admin = AdminResource(
                gateway,
                metrics.scrape,
                reactor,
                total_requests=lambda: metrics.requests,
            )
            self.admin.stats.setServiceParent(gateway)
            self._dashboard_entrypoint = config.dashboard.entrypoint
            build = BuildContext(reactor=reactor, agent=agent, router="@dashboard")
            self.admin_pipeline = Pipeline(
                [
                    build_middleware(config.middlewares[m], build)
                    for m in config.dashboard.middlewares
                ]
            )
        self.access_log: Optional[AccessLog] = None
        if config.access_log is not None:
            self.access_log = AccessLog(config.access_log.path, reactor)
            self.access_log.setServiceParent(gateway)
        # Like the reference, every proxied request carries a traceparent upstream, with or
        # without a tracing block; the block adds B3, sampling and export.
        self.tracer: Optional[Tracer] = Tracer(config.tracing or TracingConfig(), reactor, reactor)

    def admin_for(self, entrypoint: str) -> Optional[AdminResource]:
        """
        The admin resource if C{entrypoint} is the dashboard's.
        """
        return self.admin if entrypoint == self._dashboard_entrypoint else None

    def observers_for(self, entrypoint: str) -> List[Callable[[Any], None]]:
        """
        The finished-request observers of C{entrypoint}'s site.
        """
        observers: List[Callable[[Any], None]] = []
        if self.metrics is not None:
            observers.append(self.metrics.request_finished)
        if self.admin is not None:
            observers.append(self.admin.stats.request_finished)
        if self.access_log is not None:
            observers.append(self.access_log.observer(entrypoint))
        if self.tracer is not None:
            observers.append(self.tracer.request_finished)
        return observers


class Gateway(MultiService):
    """
    The whole gateway for one configuration.

    @param config: the validated configuration.
    @param reactor: the reactor to listen, connect and time with.
    @param agent: the agent for health-check probes (a non-persistent Agent by default).
    @param reuse_port: bind the HTTP and TCP entrypoints with C{SO_REUSEPORT}, as each worker
        of a multi-process gateway does (L{a3s_gateway.workers}).
    @ivar sites: the site of each HTTP entrypoint, by name.
    @ivar ports: the listening ports by entrypoint name, once started.
    """

    _log = Logger()

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        agent: Optional[IAgent] = None,
        reuse_port: bool = False,
    ) -> None:
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.reuse_port = reuse_port
        self.routes = RouteTable.from_config(config.routers)
        self._probe_pool: Optional[HTTPConnectionPool] = None
        if agent is None:
            self._probe_pool = HTTPConnectionPool(reactor, persistent=True)
            agent = Agent(reactor, pool=self._probe_pool)
        self.registry = ServiceRegistry.from_config(config, reactor, agent)
        for checker in self.registry.health_checkers:
            checker.setServiceParent(self)
        self.pool = UpstreamPool(reactor)
        self.pipelines = build_pipelines(config, reactor, agent)
        self.observability = _Observability(self, config, reactor, agent)
        self.sites: Dict[str, GatewaySite] = {}
        self.tcp: Dict[str, TcpEntrypointFactory] = {}
        self.udp: Dict[str, UdpEntrypoint] = {}
        self.ports: Dict[str, IListeningPort] = {}
        services = self.registry.services
        for name, entrypoint in config.entrypoints.items():
            if entrypoint.protocol == "tcp":
                self.tcp[name] = TcpEntrypointFactory(
                    name, entrypoint, self.routes, services, reactor
                )
            elif entrypoint.protocol == "udp":
                self.udp[name] = UdpEntrypoint(name, entrypoint, self.routes, services, reactor)
            else:
                resource = EntrypointResource(
                    name,
                    self.routes,
                    services,
                    self.pool,
                    TrustedProxies(Networks.parse(entrypoint.forwarded_headers.trusted_ips)),
                    secure=entrypoint.tls is not None,
                    pipelines=self.pipelines,
                    clock=reactor,
                    tracer=self.observability.tracer,
                    admin=self.observability.admin_for(name),
                    admin_pipeline=self.observability.admin_pipeline,
                )
                site = GatewaySite(
                    resource, reactor, entrypoint.max_request_body_bytes, prepare=resource.prepare
                )
                site.observers.extend(self.observability.observers_for(name))
                self.sites[name] = site

    def privilegedStartService(self) -> None:
        """
        Bind every entrypoint before privileges are dropped. A bind failure closes what was
        already bound and raises L{GatewayStartError}: nothing starts.
        """
        access_log = self.observability.access_log
        if access_log is not None:
            try:
                access_log.open()
            except AccessLogError as e:
                raise GatewayStartError(str(e)) from e
        self._bind()
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        """
        Start the health checkers; an embedder that calls only C{startService} gets its
        entrypoints bound here.
        """
        if not self.ports:
            self._bind()
        MultiService.startService(self)

    def _bind(self) -> None:
        try:
            for name, factory in [*self.sites.items(), *self.tcp.items()]:
                entrypoint = self.config.entrypoints[name]
                self.ports[name] = _listen_now(
                    server_endpoint(self.reactor, entrypoint, self.reuse_port), factory
                )
                self._log.info(
                    "Entrypoint {name} ({protocol}) listening on {address}",
                    name=name,
                    protocol=entrypoint.protocol,
                    address=entrypoint.address,
                )
            for name, udp in self.udp.items():
                self.ports[name] = udp.listen()
                self._log.info(
                    "Entrypoint {name} (udp) listening on {address}",
                    name=name,
                    address=self.config.entrypoints[name].address,
                )
        except Exception as e:
            for port in self.ports.values():
                port.stopListening()
            self.ports.clear()
            address = self.config.entrypoints[name].address
            raise GatewayStartError(f"Failed to bind {address} (entrypoint '{name}'): {e}") from e

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Drain: stop accepting, let in-flight requests, streams and TCP sessions finish up to
        C{shutdown_timeout_secs}, then abort what is left and close pooled connections.
        """
        yield defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in self.ports.values()]
        )
        self.ports.clear()
        drained = defer.gatherResults(
            [site.drain() for site in self.sites.values()]
            + [factory.drain() for factory in self.tcp.values()]
            + [udp.stop() for udp in self.udp.values()]
        )
        deadline = self.reactor.callLater(self.config.shutdown_timeout_secs, self._abort)
        yield drained
        if deadline.active():
            deadline.cancel()
        yield MultiService.stopService(self)
        yield defer.gatherResults(
            [pipeline.stop() for pipeline in self.pipelines.values()]
            + [self.observability.admin_pipeline.stop()]
        )
        if self.observability.tracer is not None:
            yield self.observability.tracer.stop()
        yield self.pool.close_idle()
        if self._probe_pool is not None:
            yield self._probe_pool.closeCachedConnections()

    def _abort(self) -> None:
        self._log.warn("Drain deadline passed; aborting the remaining connections")
        for site in self.sites.values():
            site.abort_all()
        for factory in self.tcp.values():
            factory.abort_all()
