"""
End-to-end tests of multi-process serving: ``a3s-gateway --workers 2`` (and twistd's
``--workers``) started for real on loopback. Two workers accept on one port, a worker killed
with SIGKILL is replaced while the port keeps answering, SIGTERM on the supervisor lets an
in-flight request finish and ends every process, and a port that cannot be shared fails the
start. Which worker holds a connection is read from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any, Dict, List, Optional, Set

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.testing import EchoResource, unused_tcp_port
from tests.support import (
    ProcessOutput,
    backend,
    gateway_config_file,
    parse_response,
    raw_request,
)

BIN = os.path.dirname(sys.executable)
READY = re.compile(rb"Worker (\d+) \(pid (\d+)\) ready")
GET = b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def ready_workers(process: ProcessOutput) -> Dict[int, int]:
    """
    The pid of each slot's latest worker that reported ready, from the supervisor's log.
    """
    return {int(slot): int(pid) for slot, pid in READY.findall(process.output)}


class _Held(protocol.Protocol):
    """
    A keep-alive client connection that sends one request and stays open.
    """

    def __init__(self) -> None:
        self.answered: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(None)


def _socket_inodes(pid: int) -> Set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def established_on(port: int, pids: List[int]) -> Dict[int, int]:
    """
    For each pid, how many established TCP connections it holds whose local port is C{port}
    (connections the process accepted), read from C{/proc/net/tcp}.
    """
    accepted = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] == "01":
                accepted.add(fields[9])
    return {pid: len(_socket_inodes(pid) & accepted) for pid in pids}


def _alive(pid: int) -> bool:
    """
    Whether C{pid} is a running (not zombie) process.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class WorkersProcessTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if not os.path.exists("/proc/net/tcp"):
            raise SkipTest("needs Linux's /proc")

    def spawn(self, argv: List[str]) -> ProcessOutput:
        process = ProcessOutput()
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            process, argv[0], argv, env=dict(os.environ)
        )

        @defer.inlineCallbacks
        def reap() -> Any:
            if not process.ended.called:
                # SIGTERM first, so that the supervisor takes its workers down with it.
                transport.signalProcess("TERM")
                killer = reactor.callLater(  # type: ignore[attr-defined]
                    15, lambda: process.ended.called or transport.signalProcess("KILL")
                )
                yield process.ended
                if killer.active():
                    killer.cancel()

        self.addCleanup(reap)
        return process

    @defer.inlineCallbacks
    def until(self, process: ProcessOutput, condition: Any, what: str) -> Any:
        """
        Poll C{condition} every 50 ms for up to 20 s while C{process} runs.
        """
        for _ in range(400):
            if condition():
                return
            if process.ended.called:
                self.fail(f"exited while waiting for {what}: {process.output.decode()}")
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}: {process.output.decode()}")

    @defer.inlineCallbacks
    def start(self, argv: List[str]) -> Any:
        process = self.spawn(argv)
        yield self.until(process, lambda: b"All 2 workers serving" in process.output, "workers")
        return process

    def command(self, port: int, url: str, *extra: str) -> List[str]:
        path = gateway_config_file(self, port, url)
        return [os.path.join(BIN, "a3s-gateway"), "--config", path, "--workers", "2", *extra]

    @defer.inlineCallbacks
    def test_two_workers_share_the_port(self) -> None:
        """
        With C{--workers 2} two worker processes accept connections on the one port: of 24
        keep-alive connections, each worker holds at least one.
        """
        server = backend(self, EchoResource("b"))
        port = unused_tcp_port()
        process = yield self.start(self.command(port, server.url))
        pids = sorted(ready_workers(process).values())
        self.assertEqual(len(pids), 2)
        held: List[_Held] = []
        for _ in range(24):
            client = _Held()
            yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                protocol.Factory.forProtocol(lambda c=client: c)  # type: ignore[misc]
            )
            held.append(client)
        yield defer.gatherResults([c.answered for c in held])
        try:
            counts = established_on(port, pids)
        finally:
            for client in held:
                client.transport.loseConnection()  # type: ignore[union-attr]
        self.assertEqual(sum(counts.values()), 24, counts)
        self.assertTrue(all(counts.values()), counts)

    @defer.inlineCallbacks
    def test_killed_worker_is_restarted(self) -> None:
        """
        A worker killed with SIGKILL is replaced by a new process in its slot; the port keeps
        answering throughout.
        """
        server = backend(self, EchoResource("b"))
        port = unused_tcp_port()
        process = yield self.start(self.command(port, server.url))
        before = ready_workers(process)
        os.kill(before[0], signal.SIGKILL)
        # Connections the kernel queued on the dying worker's socket are lost with it; once
        # the supervisor has seen it die, only the other worker accepts.
        death = b"Worker 0 (pid %d) killed by signal 9" % before[0]
        yield self.until(process, lambda: death in process.output, "the death")
        for _ in range(5):
            raw = yield raw_request(port, GET)
            self.assertEqual(parse_response(raw)[0], 200)
        yield self.until(process, lambda: ready_workers(process)[0] != before[0], "the replacement")
        after = ready_workers(process)
        self.assertEqual(after[1], before[1])
        self.assertTrue(_alive(after[0]))
        for _ in range(10):
            raw = yield raw_request(port, GET)
            self.assertEqual(parse_response(raw)[0], 200)

    @defer.inlineCallbacks
    def test_sigterm_drains_every_worker(self) -> None:
        """
        SIGTERM on the supervisor reaches every worker: the in-flight request still finishes,
        then all processes exit and the supervisor's status is 0.
        """
        requests: List[Request] = []

        class Slow(EchoResource):
            def render(self, request: Request) -> object:
                if request.path == b"/ready":
                    return b"ready"
                requests.append(request)
                return NOT_DONE_YET

        server = backend(self, Slow("b"))
        port = unused_tcp_port()
        process = yield self.start(self.command(port, server.url))
        pids = list(ready_workers(process).values())
        pending = raw_request(port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while not requests:
            yield deferLater(reactor, 0.02, lambda: None)
        os.kill(process.transport.pid, signal.SIGTERM)  # type: ignore[union-attr]
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(process.ended.called, "exited before the in-flight request finished")
        self.assertIn(b"Stopping 2 workers", process.output)
        requests[0].write(b"done")
        requests[0].finish()
        raw = yield pending
        self.assertEqual(parse_response(raw)[0], 200)
        code = yield process.ended
        self.assertEqual(code, 0, process.output.decode())
        self.assertEqual([pid for pid in pids if _alive(pid)], [])

    @defer.inlineCallbacks
    def test_twistd_workers(self) -> None:
        """
        C{twistd -n a3s-gateway --workers 2} supervises two workers too, and SIGTERM ends them
        all.
        """
        server = backend(self, EchoResource("b"))
        port = unused_tcp_port()
        path = gateway_config_file(self, port, server.url)
        argv = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "a3s-gateway"]
        process = yield self.start([*argv, "--config", path, "--workers", "2"])
        pids = list(ready_workers(process).values())
        raw = yield raw_request(port, GET)
        self.assertEqual(parse_response(raw)[0], 200)
        process.transport.signalProcess("TERM")  # type: ignore[union-attr]
        code = yield process.ended
        self.assertEqual(code, -signal.SIGTERM)
        self.assertEqual([pid for pid in pids if _alive(pid)], [])

    @defer.inlineCallbacks
    def test_port_taken_fails_the_start(self) -> None:
        """
        A port held by a socket without C{SO_REUSEPORT} cannot be shared: the workers report
        the bind error and the supervisor exits 1 rather than restarting them.
        """
        taken = backend(self, EchoResource("taken"))
        process = self.spawn(self.command(taken.port, taken.url))
        code: Optional[int] = yield process.ended
        self.assertEqual(code, 1, process.output)
        self.assertIn(b"Error: Failed to bind 127.0.0.1:%d" % taken.port, process.output)
        self.assertIn(b"before it was ready; stopping", process.output)
        self.assertNotIn(b"Traceback", process.output)
