"""
Real-socket tests for L{a3s_gateway.proxy.upstream}: the pool against a tiny raw-bytes
Twisted HTTP server on 127.0.0.1, for what the fakes cannot show (kernel buffers, real
EOF timing, TLS handshakes, flow control).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from a3s_gateway.config.schema import TimeoutsConfig
from a3s_gateway.proxy.upstream import Exchange, UpstreamConnectError, UpstreamPool

TIMEOUTS = TimeoutsConfig(connect=5, response_header=10, idle=10, total=30)
BIG_PIECE = 65536
BIG_PIECES = 80  # 5 MiB


@attr.s(auto_attribs=True)
class FakeBackend:
    """The four attributes of C{Backend} the upstream client reads."""

    scheme: str
    host: str
    port: int
    url: str


def big_piece(index: int) -> bytes:
    """Piece C{index} of the 5 MiB body: distinct per piece so reordering would show."""
    return bytes([index % 256]) * 16 + bytes(range(256)) * ((BIG_PIECE - 16) // 256) + b"\0" * 240


class RawServer(Protocol):
    """
    A minimal HTTP/1.1 server on raw bytes: reads a head (and a Content-Length body) and
    answers by path. C{/hello}: a small keep-alive response; C{/hello-then-close}: the same,
    then the server closes the connection as an upstream's keep-alive timeout would;
    C{/big}: 5 MiB in 64 KiB chunks, chunked.
    """

    factory: RawFactory

    def connectionMade(self) -> None:
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()
        self.factory.servers.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            _method, path, _version = lines[0].split(b" ")
            self.factory.paths.append(path)
            self.respond(path)

    def respond(self, path: bytes) -> None:
        assert self.transport is not None
        if path == b"/big":
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for index in range(BIG_PIECES):
                self.transport.write(b"%x\r\n%s\r\n" % (BIG_PIECE, big_piece(index)))
            self.transport.write(b"0\r\n\r\n")
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        if path == b"/hello-then-close":
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class RawFactory(Factory):
    """Counts and keeps the server connections and the paths requested."""

    protocol = RawServer
    noisy = False

    def __init__(self) -> None:
        self.servers: List[RawServer] = []
        self.paths: List[bytes] = []


class Collect:
    """A response handler that gathers the response and fires C{done} at the end."""

    def __init__(self) -> None:
        self.done: Deferred[Collect] = Deferred()
        self.code = 0
        self.chunks: List[bytes] = []
        self.on_data: Optional[Callable[[bytes], None]] = None
        self.on_done: Optional[Callable[[], None]] = None

    def response_started(
        self, code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], length: Optional[int]
    ) -> None:
        self.code = code

    def body_data(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.on_data is not None:
            self.on_data(data)

    def response_done(self) -> None:
        if self.on_done is not None:
            self.on_done()
        self.done.callback(self)

    def response_failed(self, reason: Failure, started: bool) -> None:
        self.done.errback(reason)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def self_signed() -> Tuple[bytes, bytes]:
    """A throw-away certificate and key (PEM) for IP 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class TrustOne:
    """An IPolicyForHTTPS trusting one certificate."""

    def __init__(self, certificate_pem: bytes) -> None:
        self._root = Certificate.loadPEM(certificate_pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


class UpstreamE2ETests(TestCase):
    """The pool over loopback sockets."""

    def serve(self, tls: Optional[Tuple[bytes, bytes]] = None) -> Tuple[RawFactory, FakeBackend]:
        """Start a server on 127.0.0.1, stopped (with its connections closed) at cleanup."""
        factory = RawFactory()
        if tls is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            scheme = "http"
        else:
            certificate = PrivateCertificate.loadPEM(tls[0] + tls[1])
            port = reactor.listenSSL(0, factory, certificate.options(), interface="127.0.0.1")
            scheme = "https"
        number = port.getHost().port

        def stop() -> Deferred[Any]:
            for server in factory.servers:
                assert server.transport is not None
                server.transport.loseConnection()
            closed = gatherResults([server.closed for server in factory.servers])
            return closed.addCallback(lambda _: port.stopListening())

        self.addCleanup(stop)
        url = f"{scheme}://127.0.0.1:{number}"
        return factory, FakeBackend(scheme, "127.0.0.1", number, url)

    def pool(self, **options: Any) -> UpstreamPool:
        """A pool on the real reactor whose idle connections are closed at cleanup."""
        pool = UpstreamPool(reactor, **options)
        self.addCleanup(pool.close_idle)
        return pool

    def get(
        self,
        pool: UpstreamPool,
        backend: FakeBackend,
        path: bytes,
        handler: Optional[Collect] = None,
    ) -> Tuple[Exchange, Deferred[Collect]]:
        handler = handler if handler is not None else Collect()
        exchange = pool.request(
            backend, b"GET", path, [(b"Host", b"test")], None, 0, TIMEOUTS, handler
        )
        return exchange, handler.done

    @inlineCallbacks
    def test_sequential_requests_share_one_connection(self) -> Any:
        """Sequential requests to one backend all travel over a single pooled connection."""
        factory, backend = self.serve()
        pool = self.pool()
        for _ in range(5):
            _exchange, done = self.get(pool, backend, b"/hello")
            response = yield done
            self.assertEqual((response.code, response.body), (200, b"hello"))
        self.assertEqual(len(factory.servers), 1)
        self.assertEqual(len(factory.paths), 5)

    @inlineCallbacks
    def test_stale_connection_retried(self) -> Any:
        """
        A GET sent on a pooled connection the server has just closed (its FIN not yet read) is
        sent again on a fresh connection, and the caller only sees the good response.
        """
        factory, backend = self.serve()
        pool = self.pool()
        second: Dict[str, Deferred[Collect]] = {}
        first = Collect()

        def next_request() -> None:
            # From inside response_done the released connection is reused at once, before the
            # reactor reads the server's close.
            second["done"] = self.get(pool, backend, b"/hello")[1]

        first.on_done = next_request
        self.get(pool, backend, b"/hello-then-close", first)
        yield first.done
        response = yield second["done"]
        self.assertEqual((response.code, response.body), (200, b"hello"))
        self.assertEqual(len(factory.servers), 2)

    @inlineCallbacks
    def test_idle_connection_closed_by_server_is_dropped(self) -> Any:
        """An idle connection the server closed leaves the pool; the next request connects anew."""
        factory, backend = self.serve()
        pool = self.pool()
        response = yield self.get(pool, backend, b"/hello-then-close")[1]
        self.assertEqual(response.body, b"hello")
        yield factory.servers[0].closed
        response = yield self.get(pool, backend, b"/hello")[1]
        self.assertEqual(response.body, b"hello")
        self.assertEqual(len(factory.servers), 2)

    @inlineCallbacks
    def test_big_chunked_response_with_backpressure(self) -> Any:
        """
        5 MiB chunked arrive intact and in order while the consumer keeps pausing the exchange;
        once paused, at most the rest of one socket read arrives before the resume.
        """
        _factory, backend = self.serve()
        pool = self.pool()
        handler = Collect()
        state = {"paused": False, "since_pause": 0, "most_while_paused": 0, "pauses": 0}
        received = [0]
        exchange: List[Exchange] = []

        def resume() -> None:
            state["paused"] = False
            exchange[0].resumeProducing()

        def on_data(data: bytes) -> None:
            received[0] += len(data)
            if state["paused"]:
                state["since_pause"] += len(data)
                state["most_while_paused"] = max(state["most_while_paused"], state["since_pause"])
            elif received[0] >= (state["pauses"] + 1) * 1000000:
                state["paused"] = True
                state["since_pause"] = 0
                state["pauses"] += 1
                exchange[0].pauseProducing()
                reactor.callLater(0.02, resume)

        handler.on_data = on_data
        started, done = self.get(pool, backend, b"/big", handler)
        exchange.append(started)
        response = yield done
        expected = b"".join(big_piece(index) for index in range(BIG_PIECES))
        self.assertEqual(len(response.body), len(expected))
        self.assertEqual(
            hashlib.sha256(response.body).hexdigest(), hashlib.sha256(expected).hexdigest()
        )
        self.assertGreaterEqual(state["pauses"], 5)
        self.assertLessEqual(state["most_while_paused"], 65536)

    @inlineCallbacks
    def test_connect_refused(self) -> Any:
        """A port nobody listens on fails with UpstreamConnectError naming the backend."""
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        backend = FakeBackend("http", "127.0.0.1", number, f"http://127.0.0.1:{number}")
        failure = yield self.assertFailure(
            self.get(self.pool(), backend, b"/")[1], UpstreamConnectError
        )
        self.assertEqual(failure.url, f"http://127.0.0.1:{number}")
        self.assertIn("refused", str(failure))

    @inlineCallbacks
    def test_https_pooled(self) -> Any:
        """An https backend is reached over TLS (trusted by the policy) and pooled."""
        certificate = self_signed()
        factory, backend = self.serve(tls=certificate)
        pool = self.pool(tls_policy=TrustOne(certificate[0]))
        for _ in range(3):
            response = yield self.get(pool, backend, b"/hello")[1]
            self.assertEqual((response.code, response.body), (200, b"hello"))
        self.assertEqual(len(factory.servers), 1)

    @inlineCallbacks
    def test_https_untrusted_certificate(self) -> Any:
        """A certificate the client does not trust is a connect error (TLS handshake failed)."""
        factory, backend = self.serve(tls=self_signed())
        failure = yield self.assertFailure(
            self.get(self.pool(tls_policy=TrustOne(self_signed()[0])), backend, b"/")[1],
            UpstreamConnectError,
        )
        self.assertIn("TLS handshake failed", str(failure))
        self.assertEqual(factory.paths, [])
