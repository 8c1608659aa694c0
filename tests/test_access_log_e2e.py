"""
End-to-end tests of L{a3s_gateway.observability.access_log} through a running gateway: requests
on real loopback sockets, then the lines of the access-log file; and a file that cannot be
opened stopping the start.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from a3s_gateway.config import parse_config
from a3s_gateway.gateway import Gateway, GatewayStartError
from a3s_gateway.testing import EchoResource, SlowResource
from tests.support import backend, client, port_of, simple_config, start_gateway


def read_records(path: str) -> List[Dict[str, Any]]:
    """Every record in the access-log file."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


class AccessLogEndToEndTests(TestCase):
    """The access-log file of a running gateway."""

    def start(self, url: str, extra: str = "") -> Gateway:
        self.path = os.path.join(self.mktemp(), "access.log")
        os.makedirs(os.path.dirname(self.path))
        return start_gateway(
            self, simple_config(url, extra=f'access_log {{\n  path = "{self.path}"\n}}\n{extra}')
        )

    @defer.inlineCallbacks
    def test_lines_after_requests(self) -> Any:
        """
        Each request gets one JSON line, written by the timed flush within a second: its
        routing path, status, bytes, backend, router, entrypoint, user agent and trace id (the
        one the backend received in C{traceparent}).
        """
        echo = backend(self, EchoResource("echo"))
        gateway = self.start(echo.url, 'tracing {\n  service_name = "gw"\n}\n')
        http = client(self)
        base = f"http://127.0.0.1:{port_of(gateway)}"
        response = yield http.get(
            base + "/items?page=2", headers=Headers({b"User-Agent": [b"e2e/1.0"]})
        )
        body = yield response.content()
        echoed = json.loads(body)
        yield deferLater(reactor, 1.2, lambda: None)
        [record] = read_records(self.path)
        traceparent = [value for name, value in echoed["headers"] if name.lower() == "traceparent"]
        self.assertEqual(record["trace_id"], traceparent[0].split("-")[1])
        self.assertEqual(record["client_ip"], "127.0.0.1")
        self.assertEqual(record["method"], "GET")
        self.assertEqual(record["path"], "/items")
        self.assertEqual(record["host"], f"127.0.0.1:{port_of(gateway)}")
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["response_bytes"], len(body))
        self.assertEqual(record["backend"], echo.url)
        self.assertEqual(record["router"], "all")
        self.assertEqual(record["entrypoint"], "web")
        self.assertEqual(record["user_agent"], "e2e/1.0")
        self.assertIsInstance(record["duration_ms"], float)
        self.assertIsInstance(record["ttfb_ms"], float)
        self.assertNotIn("aborted", record)

    @defer.inlineCallbacks
    def test_aborted_request(self) -> Any:
        """
        A client that leaves before the backend answers is logged with a null status and
        C{"aborted": true}; stopping the gateway writes what is buffered.
        """
        slow = backend(self, SlowResource(reactor, 5.0))
        gateway = self.start(slow.url)
        connected: defer.Deferred[Any] = protocol.ClientCreator(
            reactor, protocol.Protocol
        ).connectTCP("127.0.0.1", port_of(gateway))
        client_protocol = yield connected
        client_protocol.transport.write(b"GET /wait HTTP/1.1\r\nHost: gw\r\n\r\n")
        yield deferLater(reactor, 0.2, lambda: None)
        client_protocol.transport.loseConnection()
        yield deferLater(reactor, 0.2, lambda: None)
        yield gateway.stopService()
        [record] = read_records(self.path)
        self.assertIsNone(record["status"])
        self.assertIs(record["aborted"], True)
        self.assertEqual(record["path"], "/wait")
        self.assertEqual(record["backend"], slow.url)

    def test_unopenable_file(self) -> None:
        """
        An access-log path the gateway cannot open stops the start with a clear error, before
        any entrypoint is bound.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        gateway = Gateway(
            parse_config(
                simple_config(
                    "http://127.0.0.1:9", extra=f'access_log {{\n  path = "{directory}"\n}}\n'
                ),
                "test.hcl",
            ),
            reactor,
        )
        error = self.assertRaises(GatewayStartError, gateway.privilegedStartService)
        self.assertEqual(str(error), f"Cannot open access log '{directory}': Is a directory")
        self.assertEqual(gateway.ports, {})
