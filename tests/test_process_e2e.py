"""
End-to-end tests of the gateway as a process: ``twistd -n a3s-gateway`` and the ``a3s-gateway``
command, started for real, serving over loopback, drained by SIGTERM and SIGINT.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Dict, List, Optional

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.testing import EchoResource, unused_tcp_port
from tests.support import backend, header, parse_response, raw_request

BIN = os.path.dirname(sys.executable)


class _Process(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out: List[bytes] = []
        self.err: List[bytes] = []
        # The exit status, or minus the signal that ended the process.
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode
        self.ended.callback(code if code is not None else -reason.value.signal)

    @property
    def output(self) -> bytes:
        return b"".join(self.out) + b"".join(self.err)


class _Held(Resource):
    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.requests: List[Request] = []

    def render(self, request: Request) -> object:
        self.requests.append(request)
        return NOT_DONE_YET


def _config(port: int, url: str) -> str:
    return f"""
shutdown_timeout_secs = 20
entrypoints "web" {{
  address = "127.0.0.1:{port}"
}}
routers "all" {{
  rule    = "PathPrefix(`/`)"
  service = "svc"
}}
services "svc" {{
  load_balancer {{
    servers = [{{ url = "{url}" }}]
  }}
}}
"""


class ProcessTests(TestCase):
    timeout = 60

    def spawn(self, argv: List[str], env: Optional[Dict[str, str]] = None) -> _Process:
        process = _Process()
        environment = dict(os.environ)
        environment.update(env or {})
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            process, argv[0], argv, env=environment
        )

        def reap() -> Any:
            if not process.ended.called:
                transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(reap)
        return process

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    @defer.inlineCallbacks
    def wait_serving(self, port: int, process: _Process) -> Any:
        for _ in range(300):
            if process.ended.called:
                self.fail(f"gateway exited: {process.output.decode(errors='replace')}")
            try:
                raw = yield raw_request(
                    port, b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
            except Exception:
                yield deferLater(reactor, 0.05, lambda: None)
                continue
            return raw
        self.fail("gateway did not start listening")

    @defer.inlineCallbacks
    def drain_on(self, argv: List[str], port: int, held: _Held, sig: int, status: int) -> Any:
        process = self.spawn(argv)
        yield self.wait_serving(port, process)
        pending = raw_request(port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while len(held.requests) < 2:
            yield deferLater(reactor, 0.02, lambda: None)
        os.kill(process.transport.pid, sig)  # type: ignore[union-attr]
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(process.ended.called, "exited before the in-flight request finished")
        held.requests[1].write(b"done")
        held.requests[1].finish()
        raw = yield pending
        self.assertEqual(parse_response(raw)[0], 200)
        code = yield process.ended
        self.assertEqual(code, status, process.output.decode(errors="replace"))

    @defer.inlineCallbacks
    def test_twistd_sigterm_drains(self) -> None:
        """
        ``twistd -n a3s-gateway --config F`` serves F; SIGTERM lets the in-flight request
        finish, then the process ends.
        """
        held = _Held()

        # /ready is answered at once so that the start can be detected.
        def answer_ready(request: Request) -> object:
            if request.path == b"/ready":
                return b"ready"
            held.requests.append(request)
            return NOT_DONE_YET

        held.requests.append(None)  # type: ignore[arg-type]
        held.render = answer_ready  # type: ignore[method-assign]
        server = backend(self, held)
        port = unused_tcp_port()
        path = self.write(_config(port, server.url))
        argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "a3s-gateway", "--config", path]
        # twistd ends itself with the signal it received once the reactor has stopped.
        yield self.drain_on(argv, port, held, signal.SIGTERM, -signal.SIGTERM)

    @defer.inlineCallbacks
    def test_command_sigint_drains(self) -> None:
        """
        ``a3s-gateway --config F`` serves F; SIGINT drains it the same way and it exits 0.
        """
        held = _Held()

        def answer_ready(request: Request) -> object:
            if request.path == b"/ready":
                return b"ready"
            held.requests.append(request)
            return NOT_DONE_YET

        held.requests.append(None)  # type: ignore[arg-type]
        held.render = answer_ready  # type: ignore[method-assign]
        server = backend(self, held)
        port = unused_tcp_port()
        path = self.write(_config(port, server.url))
        argv = [os.path.join(BIN, "a3s-gateway"), "--config", path]
        yield self.drain_on(argv, port, held, signal.SIGINT, 0)

    @defer.inlineCallbacks
    def test_embedded_default_serves_demo(self) -> None:
        """
        ``twistd -n a3s-gateway`` with no config serves the demo: the echo upstreams answer
        through the gateway, alternating.
        """
        port = unused_tcp_port()
        argv = [
            os.path.join(BIN, "twistd"),
            "-n",
            "--pidfile=",
            "a3s-gateway",
            "--listen",
            f"127.0.0.1:{port}",
        ]
        process = self.spawn(argv)
        yield self.wait_serving(port, process)
        seen = set()
        for _ in range(2):
            raw = yield raw_request(
                port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            status, headers, _ = parse_response(raw)
            self.assertEqual(status, 200)
            seen.add(header(headers, b"x-backend"))
        self.assertEqual(seen, {b"echo-1", b"echo-2"})
        process.transport.signalProcess("TERM")  # type: ignore[union-attr]
        code = yield process.ended
        self.assertEqual(code, -signal.SIGTERM)

    @defer.inlineCallbacks
    def test_invalid_config_starts_nothing(self) -> None:
        """
        An invalid configuration prints the file, key path and problem, exits non-zero and
        never listens.
        """
        port = unused_tcp_port()
        path = self.write(_config(port, "http://127.0.0.1:1").replace("PathPrefix", "Prefix"))
        for argv in (
            [os.path.join(BIN, "a3s-gateway"), "--config", path],
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "a3s-gateway", "--config", path],
        ):
            process = self.spawn(argv)
            code = yield process.ended
            self.assertNotEqual(code, 0)
            self.assertIn(path.encode(), process.output)
            self.assertIn(b"routers.all.rule", process.output)
            self.assertIn(b"Unknown matcher: Prefix", process.output)
            self.assertNotIn(b"Traceback", process.output)

    @defer.inlineCallbacks
    def test_port_in_use(self) -> None:
        """
        An entrypoint whose port is taken is reported in one line and the process exits 1.
        """
        taken = backend(self, EchoResource("taken"))
        path = self.write(_config(taken.port, taken.url))
        for argv in (
            [os.path.join(BIN, "a3s-gateway"), "--config", path],
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "a3s-gateway", "--config", path],
        ):
            process = self.spawn(argv)
            code = yield process.ended
            self.assertEqual(code, 1, process.output)
            self.assertIn(b"Error: Failed to bind 127.0.0.1:%d" % taken.port, process.output)
            self.assertNotIn(b"Traceback", process.output)
