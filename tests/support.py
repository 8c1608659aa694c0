"""
Shared pieces of the end-to-end tests: a gateway running on real loopback sockets, in-process
backends, and clients that see the bytes on the wire.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from treq.client import HTTPClient
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IReactorTCP
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.config import parse_config
from a3s_gateway.gateway import Gateway
from a3s_gateway.testing import BackendServer, listen_backend

tcp_reactor: IReactorTCP = reactor  # type: ignore[assignment]


def backend(test: TestCase, resource: IResource) -> BackendServer:
    """
    Serve C{resource} on a loopback port for the duration of C{test}.
    """
    server = listen_backend(tcp_reactor, resource)
    test.addCleanup(server.stop)
    return server


def start_gateway(test: TestCase, hcl: str) -> Gateway:
    """
    Start a gateway for the configuration text C{hcl} (entrypoints on port 0) and stop it when
    C{test} ends.
    """
    gateway = Gateway(parse_config(hcl, "test.hcl"), reactor)
    gateway.privilegedStartService()
    gateway.startService()
    test.addCleanup(gateway.stopService)
    return gateway


def port_of(gateway: Gateway, entrypoint: str = "web") -> int:
    """
    The port an entrypoint of a started gateway listens on.
    """
    port: int = gateway.ports[entrypoint].getHost().port  # type: ignore[attr-defined]
    return port


def simple_config(*urls: str, extra_service: str = "", extra: str = "") -> str:
    """
    One entrypoint C{web} on an ephemeral port, one catch-all router to service C{svc} with the
    given backend URLs.
    """
    servers = ", ".join(f'{{ url = "{url}" }}' for url in urls)
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
routers "all" {{
  rule    = "PathPrefix(`/`)"
  service = "svc"
}}
services "svc" {{
  load_balancer {{
    servers = [{servers}]
  }}
{extra_service}
}}
{extra}
"""


def client(test: TestCase) -> HTTPClient:
    """
    A treq client with its own connection pool, closed when C{test} ends.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


class _Collect(protocol.Protocol):
    def __init__(self, payload: bytes, done: defer.Deferred[bytes]) -> None:
        self.payload = payload
        self.done = done
        self.received: List[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.received))


def raw_request(port: int, payload: bytes) -> defer.Deferred[bytes]:
    """
    Send C{payload} as it is to the gateway and collect every byte until the connection closes.
    """
    done: defer.Deferred[bytes] = defer.Deferred()
    connecting = protocol.ClientCreator(reactor, _Collect, payload, done).connectTCP(
        "127.0.0.1", port
    )
    connecting.addErrback(done.errback)
    return done


def parse_response(raw: bytes) -> Tuple[int, List[Tuple[bytes, bytes]], bytes]:
    """
    Split a complete HTTP/1.1 response into status, raw header list and (de-chunked) body.
    """
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = [
        (name.strip(), value.strip())
        for name, _, value in (line.partition(b":") for line in lines[1:])
    ]
    if any(n.lower() == b"transfer-encoding" and v.lower() == b"chunked" for n, v in headers):
        decoded = []
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded.append(rest[:size])
            body = rest[size + 2 :]
        body = b"".join(decoded)
    return status, headers, body


def header(headers: List[Tuple[bytes, bytes]], name: bytes) -> Optional[bytes]:
    """
    The first value of header C{name} (case-insensitive) in a raw list, or None.
    """
    for key, value in headers:
        if key.lower() == name.lower():
            return value
    return None


def json_body(body: bytes) -> Dict[str, Any]:
    """
    Decode a JSON object body.
    """
    decoded: Dict[str, Any] = json.loads(body)
    return decoded


def self_signed_certificate(directory: str) -> Tuple[str, str, bytes]:
    """
    Write a self-signed certificate for ``localhost`` (and 127.0.0.1) and its key into
    C{directory}; return the certificate path, the key path and the certificate's PEM.
    """
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path, cert_pem


def tls_request(port: int, payload: bytes, trust_pem: bytes) -> defer.Deferred[bytes]:
    """
    Like L{raw_request}, over TLS, verifying the server as ``localhost`` against C{trust_pem}.
    """
    from twisted.internet import ssl

    options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(trust_pem))
    done: defer.Deferred[bytes] = defer.Deferred()
    factory = protocol.ClientFactory.forProtocol(lambda: _Collect(payload, done))  # type: ignore[arg-type]
    reactor.connectSSL("127.0.0.1", port, factory, options)  # type: ignore[attr-defined]
    return done


class HeldResource(Resource):
    """
    A backend whose responses the test writes by hand: every request is kept open in
    C{requests}, C{arrived} fires with the next one, and C{lost} collects the requests whose
    client (the gateway) went away.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.requests: List[Request] = []
        self.lost: List[Request] = []
        self.arrived: defer.Deferred[Request] = defer.Deferred()

    def render(self, request: Request) -> object:
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: self.lost.append(request))
        arrived, self.arrived = self.arrived, defer.Deferred()
        arrived.callback(request)
        return NOT_DONE_YET


class ProcessOutput(protocol.ProcessProtocol):
    """
    Collects a child process's output (stdout and stderr, in arrival order) and its end.

    @ivar ended: fires with the exit status, or minus the signal that ended the process.
    """

    def __init__(self) -> None:
        self.chunks: List[bytes] = []
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode
        self.ended.callback(code if code is not None else -reason.value.signal)

    @property
    def output(self) -> bytes:
        return b"".join(self.chunks)


def gateway_config_file(test: TestCase, port: int, url: str, rule: str = "PathPrefix(`/`)") -> str:
    """
    Write a configuration with entrypoint C{web} on 127.0.0.1:C{port} and one router (C{rule})
    to the backend at C{url}, with a 20 s drain; return its absolute path.
    """
    import os

    text = simple_config(url).replace("127.0.0.1:0", f"127.0.0.1:{port}")
    path = os.path.abspath(test.mktemp())
    with open(path, "w") as f:
        f.write("shutdown_timeout_secs = 20\n" + text.replace("PathPrefix(`/`)", rule))
    return path
