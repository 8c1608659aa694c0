"""
Tests for L{a3s_gateway.middleware.rate_limit_redis}.

The RESP client's behaviour over time (lazy connection, handshake, timeouts, reconnection) runs
on Twisted's fake reactor; the bucket script and the middleware run against a real
``redis-server`` started by L{tests.redis_server} (skipped without it, failed without it when
``CI`` is set).
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

from treq.testing import RequestTraversalAgent
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Reply, RequestContext
from a3s_gateway.middleware.rate_limit_redis import (
    BUCKET_SCRIPT_SHA,
    RedisAddress,
    RedisClient,
    RedisRateLimit,
    RedisReplyError,
    RedisUnavailable,
    RespProtocolError,
    _Incomplete,
    bucket_ttl,
    build,
    encode_command,
    endpoint_for,
    parse_redis_url,
    parse_reply,
)
from a3s_gateway.testing import unused_tcp_port
from tests.redis_server import RedisServer, start_redis
from tests.test_rate_limit import header, request


def _build(reactor_: Any, url: str, router: str = "r", **options: object) -> RedisRateLimit:
    ctx = BuildContext(reactor=reactor_, agent=RequestTraversalAgent(Resource()), router=router)
    options = {"redis_url": url, **options}
    return build(MiddlewareConfig(name="rl", type="rate-limit-redis", options=options), ctx)


class RespTests(SynchronousTestCase):
    """
    Encoding commands and parsing replies.
    """

    def test_encode(self) -> None:
        """
        Commands are RESP arrays of bulk strings, binary-safe.
        """
        self.assertEqual(
            encode_command([b"GET", b"a\r\nb"]), b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n"
        )

    def test_parse_kinds(self) -> None:
        """
        Simple strings, errors, integers, bulk strings (null too) and nested arrays parse, and
        the position after the reply is returned.
        """
        self.assertEqual(parse_reply(b"+OK\r\nrest"), (b"OK", 5))
        error, _ = parse_reply(b"-NOSCRIPT No matching script\r\n")
        assert isinstance(error, RedisReplyError)
        self.assertEqual(error.message, "NOSCRIPT No matching script")
        self.assertEqual(parse_reply(b":-12\r\n"), (-12, 6))
        self.assertEqual(parse_reply(b"$5\r\na\r\nbc\r\n"), (b"a\r\nbc", 11))
        self.assertEqual(parse_reply(b"$-1\r\n"), (None, 5))
        self.assertEqual(
            parse_reply(b"*3\r\n:1\r\n$3\r\n0.5\r\n*1\r\n$-1\r\n")[0], [1, b"0.5", [None]]
        )

    def test_incomplete(self) -> None:
        """
        A reply cut anywhere asks for more bytes instead of parsing wrongly.
        """
        whole = b"*2\r\n:1\r\n$3\r\n0.5\r\n"
        for cut in range(len(whole)):
            self.assertRaises(_Incomplete, parse_reply, whole[:cut])

    def test_garbage(self) -> None:
        """
        Bytes that are not RESP are a protocol error.
        """
        for garbage in (b"?x\r\n", b":x\r\n", b"$3\r\nabcde\r\n"):
            self.assertRaises(RespProtocolError, parse_reply, garbage)


class UrlTests(SynchronousTestCase):
    """
    Reading C{redis_url} and choosing the endpoint.
    """

    def test_redis_url(self) -> None:
        """
        Host, port (6379 by default), password, ACL user and database are read.
        """
        self.assertEqual(parse_redis_url("redis://cache"), RedisAddress("redis", host="cache"))
        self.assertEqual(
            parse_redis_url("redis://:s%40cret@10.0.0.5:6380/3"),
            RedisAddress("redis", host="10.0.0.5", port=6380, password="s@cret", db=3),
        )
        self.assertEqual(
            parse_redis_url("rediss://app:pw@[::1]:7000"),
            RedisAddress("rediss", host="::1", port=7000, username="app", password="pw"),
        )
        self.assertEqual(
            parse_redis_url("unix:///run/redis.sock?db=2&password=pw"),
            RedisAddress("unix", path="/run/redis.sock", password="pw", db=2),
        )

    def test_bad_database(self) -> None:
        """
        A database that is not a number is refused when the middleware is built.
        """
        self.assertRaises(ValueError, parse_redis_url, "redis://cache/zero")

    def test_endpoints(self) -> None:
        """
        IP literals get plain TCP endpoints, names a resolving endpoint, unix a UNIX endpoint,
        all on the given reactor.
        """
        clock = MemoryReactorClock()
        self.assertIsInstance(
            endpoint_for(clock, RedisAddress("redis", host="127.0.0.1"), 1), TCP4ClientEndpoint
        )
        self.assertIsInstance(
            endpoint_for(clock, RedisAddress("redis", host="::1"), 1), TCP6ClientEndpoint
        )
        self.assertIsInstance(
            endpoint_for(clock, RedisAddress("redis", host="cache"), 1), HostnameEndpoint
        )
        self.assertIsInstance(
            endpoint_for(clock, RedisAddress("unix", path="/s"), 1), UNIXClientEndpoint
        )
        self.assertIsNotNone(endpoint_for(clock, RedisAddress("rediss", host="cache"), 1))

    def test_ttl(self) -> None:
        """
        The bucket TTL is C{ceil(burst/rate) + 10}, none with rate 0, capped for huge bursts.
        """
        self.assertEqual(bucket_ttl(10, 25), 13)
        self.assertEqual(bucket_ttl(5, 0), 10)
        self.assertEqual(bucket_ttl(0, 5), 0)
        self.assertEqual(bucket_ttl(1, 2**64 - 1), 2**31 - 1)


class _FakeRedis:
    """
    The server end of connections the client made on a L{MemoryReactorClock}.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock

    def accept(self, index: int = -1) -> StringTransportWithDisconnection:
        """Complete connection attempt C{index}; returns the transport the client writes to."""
        host, port, factory, _, _ = self.clock.tcpClients[index]
        protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def refuse(self, index: int = -1) -> None:
        """Fail connection attempt C{index} as refused."""
        factory = self.clock.tcpClients[index][2]
        factory.clientConnectionFailed(
            self.clock.connectors[index], Failure(ConnectionRefusedError())
        )

    @staticmethod
    def answer(transport: StringTransportWithDisconnection, data: bytes) -> None:
        """Send C{data} to the client."""
        transport.protocol.dataReceived(data)

    @staticmethod
    def received(transport: StringTransportWithDisconnection) -> bytes:
        """What the client sent so far (and forget it)."""
        data = transport.value()
        transport.clear()
        return data


def _outcome(d: defer.Deferred[Any]) -> List[Any]:
    results: List[Any] = []
    d.addBoth(results.append)
    return results


class ClientTests(SynchronousTestCase):
    """
    L{RedisClient} on a fake reactor: lazy connection, handshake, timeouts, reconnection.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.redis = _FakeRedis(self.clock)

    def _client(self, **kwargs: Any) -> RedisClient:
        endpoint = TCP4ClientEndpoint(self.clock, "127.0.0.1", 6379, timeout=1)
        return RedisClient(self.clock, endpoint, **kwargs)

    def test_lazy(self) -> None:
        """
        Building the middleware connects nowhere; the first request does, on the given reactor.
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6390", rate=1)
        self.assertEqual(self.clock.tcpClients, [])
        limiter.on_request(request())
        self.assertEqual(self.clock.tcpClients[0][:2], ("127.0.0.1", 6390))

    def test_command_and_pipelining(self) -> None:
        """
        Commands wait for the connection, are pipelined, and replies are delivered in order.
        """
        client = self._client()
        first, second = _outcome(client.execute(b"PING")), _outcome(client.execute(b"GET", b"k"))
        self.assertEqual(len(self.clock.tcpClients), 1)
        transport = self.redis.accept()
        self.assertEqual(
            self.redis.received(transport),
            encode_command([b"PING"]) + encode_command([b"GET", b"k"]),
        )
        self.redis.answer(transport, b"+PONG\r\n$1\r")
        self.assertEqual((first, second), ([b"PONG"], []))
        self.redis.answer(transport, b"\nv\r\n")
        self.assertEqual(second, [b"v"])
        third = _outcome(client.execute(b"GET", b"x"))
        self.redis.answer(transport, b"-ERR wrong\r\n")
        assert isinstance(third[0], Failure)
        self.assertIsInstance(third[0].value, RedisReplyError)
        self.assertEqual(len(self.clock.tcpClients), 1)

    def test_handshake(self) -> None:
        """
        With a password and a database, AUTH (with the ACL user) and SELECT are sent and
        answered before any command.
        """
        client = self._client(username="app", password="pw", db=3)
        result = _outcome(client.execute(b"PING"))
        transport = self.redis.accept()
        self.assertEqual(self.redis.received(transport), encode_command([b"AUTH", b"app", b"pw"]))
        self.redis.answer(transport, b"+OK\r\n")
        self.assertEqual(self.redis.received(transport), encode_command([b"SELECT", b"3"]))
        self.redis.answer(transport, b"+OK\r\n")
        self.assertEqual(self.redis.received(transport), encode_command([b"PING"]))
        self.redis.answer(transport, b"+PONG\r\n")
        self.assertEqual(result, [b"PONG"])

    def test_handshake_refused(self) -> None:
        """
        A refused AUTH fails the waiting commands as unavailable and drops the connection.
        """
        client = self._client(password="wrong")
        result = _outcome(client.execute(b"PING"))
        transport = self.redis.accept()
        self.redis.answer(transport, b"-WRONGPASS invalid username-password pair\r\n")
        assert isinstance(result[0], Failure)
        self.assertIsInstance(result[0].value, RedisUnavailable)
        self.assertIn("WRONGPASS", result[0].getErrorMessage())
        self.assertTrue(transport.disconnected)

    def test_command_timeout(self) -> None:
        """
        A command unanswered after the timeout fails as unavailable, its connection is dropped
        (a hung Redis), and the next command reconnects.
        """
        client = self._client(timeout=1.0)
        result = _outcome(client.execute(b"PING"))
        transport = self.redis.accept()
        self.clock.advance(0.9)
        self.assertEqual(result, [])
        self.clock.advance(0.1)
        assert isinstance(result[0], Failure)
        self.assertIsInstance(result[0].value, RedisUnavailable)
        self.assertTrue(transport.disconnected)
        client.execute(b"PING")
        self.assertEqual(len(self.clock.tcpClients), 2)

    def test_connect_timeout(self) -> None:
        """
        A connection that is not made (or not through its handshake) within the timeout fails
        the waiting commands.
        """
        client = self._client(password="pw")
        result = _outcome(client.execute(b"PING"))
        transport = self.redis.accept()
        self.clock.advance(1.0)
        assert isinstance(result[0], Failure)
        self.assertIsInstance(result[0].value, RedisUnavailable)
        self.assertTrue(transport.disconnected)

    def test_refused_then_fail_fast(self) -> None:
        """
        After a refused connection, commands fail at once for the reconnect delay, then a new
        connection is tried.
        """
        client = self._client(reconnect_delay=1.0)
        first = _outcome(client.execute(b"PING"))
        self.redis.refuse()
        assert isinstance(first[0], Failure)
        self.assertIsInstance(first[0].value, RedisUnavailable)
        second = _outcome(client.execute(b"PING"))
        assert isinstance(second[0], Failure)
        self.assertEqual(len(self.clock.tcpClients), 1)
        self.clock.advance(1.0)
        third = _outcome(client.execute(b"PING"))
        self.assertEqual(len(self.clock.tcpClients), 2)
        transport = self.redis.accept()
        self.redis.answer(transport, b"+PONG\r\n")
        self.assertEqual(third, [b"PONG"])

    def test_connection_lost(self) -> None:
        """
        A lost connection fails its pending commands; the next command reconnects at once.
        """
        client = self._client()
        pending = _outcome(client.execute(b"PING"))
        transport = self.redis.accept()
        transport.loseConnection()
        assert isinstance(pending[0], Failure)
        self.assertIsInstance(pending[0].value, RedisUnavailable)
        client.execute(b"PING")
        self.assertEqual(len(self.clock.tcpClients), 2)

    def test_garbage_from_server(self) -> None:
        """
        Bytes that are not RESP drop the connection and fail the pending command.
        """
        client = self._client()
        pending = _outcome(client.execute(b"PING"))
        transport = self.redis.accept()
        self.redis.answer(transport, b"HTTP/1.1 400 Bad Request\r\n")
        self.assertTrue(transport.disconnected)
        assert isinstance(pending[0], Failure)
        self.assertIn("protocol error", pending[0].getErrorMessage())

    def test_stop(self) -> None:
        """
        C{stop} closes the connection, fires once it is closed, and later commands fail.
        """
        client = self._client()
        pending = _outcome(client.execute(b"PING"))
        transport = self.redis.accept()
        stopped = _outcome(client.stop())
        assert isinstance(pending[0], Failure)
        self.assertEqual(stopped, [None])
        self.assertFalse(transport.connected)
        failed = _outcome(client.execute(b"PING"))
        assert isinstance(failed[0], Failure)

    def test_stop_while_connecting(self) -> None:
        """
        C{stop} during a connection attempt cancels it.
        """
        client = self._client()
        waiting = _outcome(client.execute(b"PING"))
        self.assertEqual(_outcome(client.stop()), [None])
        assert isinstance(waiting[0], Failure)


class MiddlewareFakeRedisTests(SynchronousTestCase):
    """
    The middleware's handling of Redis's answers, on a fake reactor.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.redis = _FakeRedis(self.clock)

    def _ask(self, limiter: RedisRateLimit, ctx: RequestContext) -> Tuple[List[Any], Any]:
        result = limiter.on_request(ctx)
        assert isinstance(result, defer.Deferred)
        return _outcome(result), result

    def test_script_reply(self) -> None:
        """
        The script runs by EVALSHA on the router's per-key bucket; its answer becomes the
        decision (rejection with the distributed body and headers).
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6379", router="api", rate=2, burst=4)
        ctx = request("10.1.2.3")
        outcome, _ = self._ask(limiter, ctx)
        transport = self.redis.accept()
        sent = self.redis.received(transport)
        self.assertEqual(
            sent,
            encode_command(
                [
                    b"EVALSHA",
                    BUCKET_SCRIPT_SHA,
                    b"1",
                    b"a3s:ratelimit:api:ip:10.1.2.3",
                    b"2",
                    b"4",
                    b"12",
                ]
            ),
        )
        self.redis.answer(transport, b"*2\r\n:0\r\n$3\r\n0.5\r\n")
        reply = outcome[0]
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 429)
        self.assertEqual(json.loads(reply.body), {"error": "Rate limit exceeded (distributed)"})
        self.assertEqual(header(reply, b"Content-Type"), b"application/json")
        self.assertEqual(header(reply, b"Retry-After"), b"1")
        self.assertEqual(header(reply, b"X-RateLimit-Limit"), b"4")
        self.assertEqual(header(reply, b"X-RateLimit-Remaining"), b"0")
        self.assertEqual(header(reply, b"X-RateLimit-Reset"), b"2")

    def test_noscript_fallback(self) -> None:
        """
        When Redis does not know the script (NOSCRIPT), it is sent again with EVAL.
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6379", rate=1)
        ctx = request()
        outcome, _ = self._ask(limiter, ctx)
        transport = self.redis.accept()
        self.redis.received(transport)
        self.redis.answer(transport, b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
        self.assertTrue(self.redis.received(transport).startswith(b"*7\r\n$4\r\nEVAL\r\n"))
        self.redis.answer(transport, b"*2\r\n:1\r\n$1\r\n0\r\n")
        self.assertEqual(outcome, [None])
        headers = Headers()
        limiter.on_response(ctx, 200, headers)
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Remaining"), [b"0"])

    def test_script_error(self) -> None:
        """
        Any other error reply, or an answer of the wrong shape, is a Redis failure: allowed
        by default, without rate-limit headers.
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6379", rate=1)
        transport = None
        for answer in (b"-ERR boom\r\n", b":1\r\n", b"*2\r\n:1\r\n$3\r\nnan\r\n"):
            ctx = request()
            outcome, _ = self._ask(limiter, ctx)
            if transport is None:
                transport = self.redis.accept()
            self.redis.answer(transport, answer)
            self.assertEqual(outcome, [None])
            headers = Headers()
            limiter.on_response(ctx, 200, headers)
            self.assertFalse(headers.hasHeader(b"X-RateLimit-Limit"))

    def test_unreachable_allow(self) -> None:
        """
        C{on_redis_error = "allow"} (the default) lets requests through when Redis is down.
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6379", rate=1)
        outcome, _ = self._ask(limiter, request())
        self.redis.refuse()
        self.assertEqual(outcome, [None])

    def test_unreachable_deny(self) -> None:
        """
        C{on_redis_error = "deny"} answers 503 with a JSON error when Redis is down.
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6379", rate=1, on_redis_error="deny")
        outcome, _ = self._ask(limiter, request())
        self.redis.refuse()
        reply = outcome[0]
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 503)
        self.assertEqual(json.loads(reply.body), {"error": "Rate limiter unavailable"})
        self.assertEqual(header(reply, b"Content-Type"), b"application/json")

    def test_hung_redis_deny(self) -> None:
        """
        A Redis that does not answer makes the request wait one timeout at most.
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6379", rate=1, on_redis_error="deny")
        outcome, _ = self._ask(limiter, request())
        self.redis.accept()
        self.clock.advance(1.0)
        reply = outcome[0]
        assert isinstance(reply, Reply)
        self.assertEqual(reply.status, 503)

    def test_cancelled_request(self) -> None:
        """
        A request phase cancelled while Redis is answering (the client left) neither drops
        the connection nor disturbs the next request.
        """
        limiter = _build(self.clock, "redis://127.0.0.1:6379", rate=5)
        _, asking = self._ask(limiter, request())
        transport = self.redis.accept()
        asking.addErrback(lambda f: None)
        asking.cancel()
        self.assertFalse(transport.disconnected)
        outcome, _ = self._ask(limiter, request())
        self.redis.answer(transport, b"*2\r\n:1\r\n$1\r\n4\r\n*2\r\n:1\r\n$1\r\n3\r\n")
        self.assertEqual(outcome, [None])

    def test_header_key(self) -> None:
        """
        The Redis key follows the C{key} option.
        """
        limiter = _build(self.clock, "redis://h:1", router="web", rate=1, key="header:X-Tenant")
        self.assertEqual(
            limiter.redis_key(request(headers=[(b"X-Tenant", b"acme")])),
            b"a3s:ratelimit:web:h:acme",
        )
        self.assertEqual(limiter.redis_key(request("10.0.0.7")), b"a3s:ratelimit:web:ip:10.0.0.7")
        limiter = _build(self.clock, "redis://h:1", router="web", rate=1, key="global")
        self.assertEqual(limiter.redis_key(request()), b"a3s:ratelimit:web:global")


class RealRedisTests(TestCase):
    """
    The middleware against a real ``redis-server``.
    """

    timeout = 30

    def setUp(self) -> defer.Deferred[None]:  # type: ignore[override]
        def started(server: RedisServer) -> None:
            self.server = server

        return start_redis(self).addCallback(started)

    def limiter(self, url: Optional[str] = None, **options: Any) -> RedisRateLimit:
        """A middleware on the real reactor, stopped when the test ends."""
        middleware = _build(reactor, url or self.server.url, **options)
        self.addCleanup(middleware.stop)
        return middleware

    def direct(self, url: Optional[str] = None) -> RedisClient:
        """A client for looking into Redis, stopped when the test ends."""
        address = parse_redis_url(url or self.server.url)
        client = RedisClient(
            reactor,
            endpoint_for(reactor, address, 5),
            password=address.password,
            db=address.db,
            timeout=5,
        )
        self.addCleanup(client.stop)
        return client

    @staticmethod
    def ask(limiter: RedisRateLimit, ctx: Optional[RequestContext] = None) -> Any:
        """The request phase's result as a Deferred."""
        return defer.maybeDeferred(limiter.on_request, ctx if ctx is not None else request())

    @defer.inlineCallbacks
    def test_bucket(self) -> Any:
        """
        The first C{burst} requests pass, the next gets the distributed 429; the bucket is the
        hash C{a3s:ratelimit:<router>:<key>} with C{tokens} and C{last_refill} and a TTL of
        C{ceil(burst/rate) + 10} seconds.
        """
        limiter = self.limiter(rate=1, burst=3)
        ctx = request()
        self.assertIsNone((yield self.ask(limiter, ctx)))
        headers = Headers()
        limiter.on_response(ctx, 200, headers)
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Remaining"), [b"2"])
        self.assertIsNone((yield self.ask(limiter)))
        self.assertIsNone((yield self.ask(limiter)))
        reply = yield self.ask(limiter)
        self.assertEqual(reply.status, 429)
        self.assertEqual(json.loads(reply.body), {"error": "Rate limit exceeded (distributed)"})
        direct = self.direct()
        fields = yield direct.execute(b"HGETALL", b"a3s:ratelimit:r:ip:10.0.0.1")
        stored = dict(zip(fields[::2], fields[1::2]))
        self.assertEqual(sorted(stored), [b"last_refill", b"tokens"])
        self.assertLess(float(stored[b"tokens"]), 1)
        ttl = yield direct.execute(b"TTL", b"a3s:ratelimit:r:ip:10.0.0.1")
        self.assertTrue(0 < ttl <= 13, ttl)

    @defer.inlineCallbacks
    def test_refill_on_redis_clock(self) -> Any:
        """
        Refill is computed from Redis's own time: moving the stored C{last_refill} two seconds
        into the past gives back two tokens, whatever the gateway's clock says.
        """
        limiter = self.limiter(rate=1, burst=5)
        for _ in range(5):
            yield self.ask(limiter)
        self.assertIsInstance((yield self.ask(limiter)), Reply)
        key = b"a3s:ratelimit:r:ip:10.0.0.1"
        direct = self.direct()
        last = float((yield direct.execute(b"HGET", key, b"last_refill")))
        yield direct.execute(b"HSET", key, b"last_refill", repr(last - 2.0).encode())
        self.assertIsNone((yield self.ask(limiter)))
        self.assertIsNone((yield self.ask(limiter)))
        self.assertIsInstance((yield self.ask(limiter)), Reply)

    @defer.inlineCallbacks
    def test_shared_between_processes(self) -> Any:
        """
        Two middlewares with their own connections (two gateway processes) share one budget.
        """
        first, second = self.limiter(rate=1, burst=4), self.limiter(rate=1, burst=4)
        results = []
        for limiter in (first, second, first, second, first, second):
            results.append((yield self.ask(limiter)))
        self.assertEqual(results[:4], [None] * 4)
        self.assertEqual([r.status for r in results[4:]], [429, 429])

    @defer.inlineCallbacks
    def test_per_key_and_router(self) -> Any:
        """
        Each client address has its own bucket, and so does each router.
        """
        limiter = self.limiter(rate=1, burst=1)
        self.assertIsNone((yield self.ask(limiter, request("10.0.0.1"))))
        self.assertIsInstance((yield self.ask(limiter, request("10.0.0.1"))), Reply)
        self.assertIsNone((yield self.ask(limiter, request("10.0.0.2"))))
        other = _build(reactor, self.server.url, router="other", rate=1, burst=1)
        self.addCleanup(other.stop)
        self.assertIsNone((yield self.ask(other, request("10.0.0.1"))))

    @defer.inlineCallbacks
    def test_atomic_under_concurrency(self) -> Any:
        """
        Many concurrent requests from several processes take exactly C{burst} tokens: the
        read-modify-write is atomic in Redis (rate 0 so that nothing refills meanwhile).
        """
        limiters = [self.limiter(rate=0, burst=30) for _ in range(5)]
        results = yield defer.gatherResults(
            [self.ask(limiters[i % 5], request("10.9.9.9")) for i in range(100)]
        )
        self.assertEqual(sum(1 for r in results if r is None), 30)
        self.assertEqual(sum(1 for r in results if isinstance(r, Reply)), 70)

    @defer.inlineCallbacks
    def test_script_flushed(self) -> Any:
        """
        After SCRIPT FLUSH (or a Redis restart) the script is loaded again by EVAL.
        """
        limiter = self.limiter(rate=1, burst=5)
        yield self.ask(limiter)
        yield self.direct().execute(b"SCRIPT", b"FLUSH")
        ctx = request()
        self.assertIsNone((yield self.ask(limiter, ctx)))
        headers = Headers()
        limiter.on_response(ctx, 200, headers)
        self.assertEqual(headers.getRawHeaders(b"X-RateLimit-Remaining"), [b"3"])

    @defer.inlineCallbacks
    def test_password_and_database(self) -> Any:
        """
        A password and a database in the URL are used: the bucket lands in that database, and
        a wrong password is a Redis failure (denied here).
        """
        yield self.direct().execute(b"CONFIG", b"SET", b"requirepass", b"s3cret")
        url = f"redis://:s3cret@127.0.0.1:{self.server.port}/4"
        limiter = self.limiter(url, rate=1)
        self.assertIsNone((yield self.ask(limiter)))
        exists = yield self.direct(url).execute(b"EXISTS", b"a3s:ratelimit:r:ip:10.0.0.1")
        self.assertEqual(exists, 1)
        wrong = self.limiter(
            f"redis://:nope@127.0.0.1:{self.server.port}", rate=1, on_redis_error="deny"
        )
        self.assertEqual((yield self.ask(wrong)).status, 503)

    @defer.inlineCallbacks
    def test_down_allow_then_recovers(self) -> Any:
        """
        With Redis stopped, requests pass without rate-limit headers (fail open); once it is
        back on the same port, limiting resumes.
        """
        limiter = self.limiter(rate=1, burst=1)
        limiter.client.reconnect_delay = 0.1
        self.assertIsNone((yield self.ask(limiter)))
        self.server.stop()
        for _ in range(3):
            ctx = request()
            self.assertIsNone((yield self.ask(limiter, ctx)))
            self.assertNotIn("rl", ctx.notes)
        yield self.server.start()
        self.assertIsNone((yield _until_answered(limiter)))
        self.assertEqual((yield self.ask(limiter)).status, 429)

    @defer.inlineCallbacks
    def test_down_deny_then_recovers(self) -> Any:
        """
        With Redis stopped and C{on_redis_error = "deny"}, requests get 503; after a restart
        they are limited normally again.
        """
        limiter = self.limiter(rate=1, burst=1, on_redis_error="deny")
        limiter.client.reconnect_delay = 0.1
        self.assertIsNone((yield self.ask(limiter)))
        self.server.stop()
        self.assertEqual((yield self.ask(limiter)).status, 503)
        self.assertEqual((yield self.ask(limiter)).status, 503)
        yield self.server.start()
        self.assertIsNone((yield _until_answered(limiter)))
        self.assertEqual((yield self.ask(limiter)).status, 429)

    @defer.inlineCallbacks
    def test_hung_redis(self) -> Any:
        """
        A frozen Redis (accepting connections, answering nothing) holds a request for one
        timeout at most; when it thaws, limiting resumes.
        """
        limiter = self.limiter(rate=0, burst=1, on_redis_error="deny")
        limiter.client.timeout = 0.3
        limiter.client.reconnect_delay = 0.1
        self.assertIsNone((yield self.ask(limiter)))
        self.server.pause()
        started = reactor.seconds()
        self.assertEqual((yield self.ask(limiter)).status, 503)
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertEqual((yield self.ask(limiter)).status, 503)
        self.server.resume()
        self.assertEqual((yield _until_answered(limiter)).status, 429)

    @defer.inlineCallbacks
    def test_never_started(self) -> Any:
        """
        A Redis address where nothing listens fails open by default.
        """
        limiter = self.limiter(f"redis://127.0.0.1:{unused_tcp_port()}", rate=1)
        self.assertIsNone((yield self.ask(limiter)))


@defer.inlineCallbacks
def _until_answered(limiter: RedisRateLimit) -> Any:
    """
    Ask C{limiter} every 0.1 s (at most 5 s) until Redis decides a request (a 429, or a pass
    noted with rate-limit headers) rather than the limiter's failure handling; fire with it.
    """
    for _ in range(50):
        ctx = request()
        result = yield defer.maybeDeferred(limiter.on_request, ctx)
        if limiter.name in ctx.notes or (isinstance(result, Reply) and result.status == 429):
            return result
        yield deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("Redis never answered again")
