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
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from a3s_gateway.tap import NURSERY_ENV, gc_nursery
from a3s_gateway.testing import EchoResource, unused_tcp_port
from tests.support import (
    HeldResource,
    ProcessOutput,
    backend,
    gateway_config_file,
    header,
    parse_response,
    raw_request,
)

BIN = os.path.dirname(sys.executable)


class ProcessTests(TestCase):
    timeout = 60

    def spawn(
        self,
        argv: List[str],
        env: Optional[Dict[str, str]] = None,
        replace_env: Optional[Dict[str, str]] = None,
    ) -> ProcessOutput:
        process = ProcessOutput()
        environment = dict(os.environ if replace_env is None else replace_env)
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

    @defer.inlineCallbacks
    def wait_listening(self, port: int, process: ProcessOutput) -> Any:
        """
        Wait until the gateway accepts connections on C{port} (it binds before it serves).
        """
        for _ in range(300):
            if process.ended.called:
                self.fail(f"gateway exited: {process.output.decode(errors='replace')}")
            try:
                connection = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                    protocol.Factory.forProtocol(protocol.Protocol)
                )
            except ConnectError:
                yield deferLater(reactor, 0.05, lambda: None)
                continue
            connection.transport.loseConnection()
            return
        self.fail("gateway did not start listening")

    @defer.inlineCallbacks
    def drain_on(
        self, argv: List[str], port: int, held: HeldResource, sig: int, status: int
    ) -> Any:
        process = self.spawn(argv)
        yield self.wait_listening(port, process)
        pending = raw_request(port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        request = yield held.arrived
        os.kill(process.transport.pid, sig)  # type: ignore[union-attr]
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(process.ended.called, "exited before the in-flight request finished")
        request.write(b"done")
        request.finish()
        raw = yield pending
        self.assertEqual(parse_response(raw)[0], 200)
        code = yield process.ended
        self.assertEqual(code, status, process.output.decode(errors="replace"))
        return process

    @defer.inlineCallbacks
    def test_twistd_sigterm_drains(self) -> None:
        """
        ``twistd -n a3s-gateway --config F`` serves F; SIGTERM lets the in-flight request
        finish, then the process ends.
        """
        held = HeldResource()
        server = backend(self, held)
        port = unused_tcp_port()
        path = gateway_config_file(self, port, server.url)
        argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "a3s-gateway", "--config", path]
        # twistd ends itself with the signal it received once the reactor has stopped.
        yield self.drain_on(argv, port, held, signal.SIGTERM, -signal.SIGTERM)

    @defer.inlineCallbacks
    def test_command_sigint_drains(self) -> None:
        """
        ``a3s-gateway --config F`` serves F; SIGINT drains it the same way and it exits 0.
        """
        held = HeldResource()
        server = backend(self, held)
        port = unused_tcp_port()
        path = gateway_config_file(self, port, server.url)
        argv = [os.path.join(BIN, "a3s-gateway"), "--config", path]
        process = yield self.drain_on(argv, port, held, signal.SIGINT, 0)
        self.assertIn(b"reactor class: a3s_gateway.reactor.GatewayReactor", process.output)

    def environment_of(self, pid: int) -> Dict[str, str]:
        """
        The environment process C{pid} runs with (as exec gave it).
        """
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
        return {name.decode(): value.decode() for name, value in pairs}

    @defer.inlineCallbacks
    def test_command_chooses_nursery(self) -> None:
        """
        ``a3s-gateway`` and ``python -m a3s_gateway.cli`` run on PyPy with the nursery size
        L{gc_nursery} chooses: the process started is the one serving, now with
        ``PYPY_GC_NURSERY`` in its environment. On CPython the environment is left as it was.
        """
        if not os.path.exists("/proc/self/environ"):
            raise SkipTest("needs /proc to read a process's environment")
        server = backend(self, EchoResource("fine"))
        expected = gc_nursery({})
        for start in (
            [os.path.join(BIN, "a3s-gateway")],
            [sys.executable, "-m", "a3s_gateway.cli"],
        ):
            port = unused_tcp_port()
            path = gateway_config_file(self, port, server.url)
            environment = {k: v for k, v in os.environ.items() if k != NURSERY_ENV}
            process = self.spawn([*start, "--config", path], replace_env=environment)
            yield self.wait_listening(port, process)
            response = yield raw_request(
                port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            self.assertEqual(parse_response(response)[0], 200)
            pid = process.transport.pid  # type: ignore[union-attr]
            self.assertEqual(self.environment_of(pid).get(NURSERY_ENV), expected, start)
            os.kill(pid, signal.SIGTERM)
            code = yield process.ended
            self.assertEqual(code, 0, process.output)

    @defer.inlineCallbacks
    def test_command_keeps_operator_nursery(self) -> None:
        """
        A ``PYPY_GC_NURSERY`` the operator set is the one the gateway runs with, where the
        command would otherwise choose one.
        """
        if not os.path.exists("/proc/self/environ"):
            raise SkipTest("needs /proc to read a process's environment")
        if gc_nursery({}) is None:
            raise SkipTest("the command chooses no nursery here (not PyPy, or no cache size)")
        server = backend(self, EchoResource("fine"))
        port = unused_tcp_port()
        path = gateway_config_file(self, port, server.url)
        argv = [os.path.join(BIN, "a3s-gateway"), "--config", path]
        process = self.spawn(argv, {NURSERY_ENV: "2MB"})
        yield self.wait_listening(port, process)
        pid = process.transport.pid  # type: ignore[union-attr]
        self.assertEqual(self.environment_of(pid)[NURSERY_ENV], "2MB")

    @defer.inlineCallbacks
    def test_twistd_on_gateway_reactor(self) -> None:
        """
        ``twistd --reactor=a3s -n a3s-gateway`` serves on the gateway's reactor and drains on
        SIGTERM.
        """
        held = HeldResource()
        server = backend(self, held)
        port = unused_tcp_port()
        path = gateway_config_file(self, port, server.url)
        argv = [os.path.join(BIN, "twistd"), "--reactor=a3s", "-n", "--pidfile=", "a3s-gateway"]
        process = yield self.drain_on(
            [*argv, "--config", path], port, held, signal.SIGTERM, -signal.SIGTERM
        )
        self.assertIn(b"reactor class: a3s_gateway.reactor.GatewayReactor", process.output)

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
        yield self.wait_listening(port, process)
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
        path = gateway_config_file(self, port, "http://127.0.0.1:1", rule="Prefix(`/`)")
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
        path = gateway_config_file(self, taken.port, taken.url)
        for argv in (
            [os.path.join(BIN, "a3s-gateway"), "--config", path],
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "a3s-gateway", "--config", path],
        ):
            process = self.spawn(argv)
            code = yield process.ended
            self.assertEqual(code, 1, process.output)
            self.assertIn(b"Error: Failed to bind 127.0.0.1:%d" % taken.port, process.output)
            self.assertNotIn(b"Traceback", process.output)
