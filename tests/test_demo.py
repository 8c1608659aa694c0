"""Tests for a3s_gateway.demo: the newcomer demo's four upstreams."""

from __future__ import annotations

import json
import socket
from typing import Any, Generator

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from a3s_gateway.demo import DemoUpstreams
from a3s_gateway.testing import unused_tcp_port

NAMES = ["echo-1", "echo-2", "chat-1", "chat-2"]


class DefaultPortsTests(SynchronousTestCase):
    """By default the demo listens where the embedded default configuration points."""

    def test_default_ports_and_interface(self) -> None:
        """Echo upstreams on 18081-18082, chat upstreams on 18091-18092, all on 127.0.0.1."""
        memory = MemoryReactorClock()
        demo = DemoUpstreams(memory)
        demo.privilegedStartService()
        demo.startService()
        listened = [(port, interface) for port, _, _, interface in memory.tcpServers]
        self.assertEqual(
            listened,
            [
                (18081, "127.0.0.1"),
                (18082, "127.0.0.1"),
                (18091, "127.0.0.1"),
                (18092, "127.0.0.1"),
            ],
        )
        self.assertEqual(
            demo.urls,
            {
                "echo-1": "http://127.0.0.1:18081",
                "echo-2": "http://127.0.0.1:18082",
                "chat-1": "http://127.0.0.1:18091",
                "chat-2": "http://127.0.0.1:18092",
            },
        )
        self.assertEqual([service.name for service in demo], NAMES)
        self.successResultOf(demo.stopService())
        self.assertEqual(demo.ports, {})


class DemoUpstreamsTests(TestCase):
    """DemoUpstreams on real loopback sockets."""

    def setUp(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def test_four_listeners_answer_and_stop(self) -> Generator[Deferred[Any], Any, None]:
        """With port 0 it binds four distinct ports that answer as their upstream, then stops."""
        demo = DemoUpstreams(reactor, echo_ports=(0, 0), chat_ports=(0, 0), token_interval=0.001)
        demo.startService()
        self.addCleanup(lambda: demo.stopService() if demo.running else None)
        ports = demo.ports
        self.assertEqual(sorted(ports), sorted(NAMES))
        self.assertEqual(len(set(ports.values())), 4)
        self.assertNotIn(0, ports.values())
        urls = demo.urls
        for name in NAMES:
            self.assertEqual(urls[name], f"http://127.0.0.1:{ports[name]}")
            health = yield self.client.get(urls[name] + "/health")
            self.assertEqual(health.headers.getRawHeaders(b"x-backend"), [name.encode()])
            self.assertEqual((yield health.json()), {"status": "ok"})
        echo = yield self.client.get(urls["echo-2"] + "/hello?x=1")
        payload = yield echo.json()
        self.assertEqual((payload["backend"], payload["path"]), ("echo-2", "/hello"))
        chat = yield self.client.post(
            urls["chat-1"] + "/v1/chat/completions",
            data=json.dumps(
                {"stream": True, "messages": [{"role": "user", "content": "hey"}]}
            ).encode(),
        )
        stream = yield chat.text()
        self.assertTrue(stream.endswith("data: [DONE]\n\n"))
        self.assertIn('"content": " chat-1!"', stream)

        yield demo.stopService()
        self.assertFalse(demo.running)
        self.assertEqual(demo.ports, {})
        yield self.assertFailure(self.client.get(urls["echo-1"] + "/health"), ConnectError)

    @inlineCallbacks
    def test_taken_port_fails_startup_cleanly(self) -> Generator[Deferred[Any], Any, None]:
        """A port already in use raises at start, and the ports bound before it are released."""
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        first = unused_tcp_port()
        demo = DemoUpstreams(reactor, echo_ports=(first, taken), chat_ports=(0, 0))
        self.assertRaises(CannotListenError, demo.privilegedStartService)
        self.assertEqual(demo.ports, {})
        self.assertFalse(demo.running)
        # stopListening completes on the next reactor turn.
        yield deferLater(reactor, 0, lambda: None)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", first))
