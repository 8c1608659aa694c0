# -*- test-case-name: tests.test_rate_limit_redis -*-
"""
The ``rate-limit-redis`` middleware: the token buckets of ``rate-limit``
(L{a3s_gateway.middleware.rate_limit}) kept in Redis, so that every gateway process using the
same Redis shares one budget per key.

Each decision is one atomic server-side Lua script (L{BUCKET_SCRIPT}, sent with EVALSHA and
re-sent with EVAL when Redis answers NOSCRIPT) that reads the time from Redis's own ``TIME`` —
the clocks of the gateway hosts do not matter — refills and takes a token from the hash
``a3s:ratelimit:<router>:<key>`` (fields ``tokens`` and ``last_refill``; the reference used one
bucket per router, ``a3s:ratelimit:<router>``), sets its TTL to ``ceil(burst/rate) + 10``
seconds (an expired bucket would be full again anyway; with ``rate = 0`` it never expires) and
returns whether the request was allowed and the exact tokens left, from which the same
L{Decision} as the in-process limiter is made. A rejection is
``429 {"error":"Rate limit exceeded (distributed)"}`` with the same headers as ``rate-limit``.

When Redis cannot be reached, answers an error or does not answer within L{CALL_TIMEOUT},
``on_redis_error = "allow"`` (the default, as the reference fails open) lets the request through
without rate-limit headers, and ``"deny"`` answers ``503 {"error":"Rate limiter unavailable"}``.

The Redis client is the small RESP client below (L{RedisClient}) rather than txredisapi:
txredisapi imports the global reactor at import time and uses it to connect, to time out replies
and to schedule reconnects, so it cannot run on the reactor given to the middleware (nor on the
fake reactors of the unit tests), and its lazy connections queue commands without a bound while
Redis is away. The client keeps one lazy persistent connection, authenticates and selects the
database when it connects, reconnects on the next command after the connection is lost, fails
commands fast for L{RECONNECT_DELAY} after a failed connection attempt, and aborts a connection
whose command timed out (a hung Redis) so that the next command starts afresh.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Set, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

import attr
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    Reply,
    RequestContext,
    RequestResult,
    json_reply,
)
from a3s_gateway.middleware.rate_limit import Decision, KeyFunction, key_function, limits

CALL_TIMEOUT = 1.0
"""Seconds a Redis command (or connecting, with authentication) may take before it fails."""

RECONNECT_DELAY = 1.0
"""Seconds during which commands fail at once after an attempt to connect failed."""

MAX_TTL = 2**31 - 1
"""The largest bucket TTL sent to Redis (about 68 years), below Redis's own limit."""

_LOG = Logger()


class RedisUnavailable(Exception):
    """
    Redis could not be reached, the connection was lost, or a command timed out.
    """


class RedisReplyError(Exception):
    """
    Redis answered a command with an error reply (its message is the exception's argument).
    """

    @property
    def message(self) -> str:
        """The error reply's text, such as ``NOSCRIPT No matching script...``."""
        return str(self.args[0])


class RespProtocolError(Exception):
    """
    Bytes from the server that are not RESP.
    """


class _Incomplete(Exception):
    """More bytes are needed to parse a reply."""


RespValue = Union[None, int, bytes, RedisReplyError, List[Any]]


def encode_command(args: Sequence[bytes]) -> bytes:
    """
    A command as a RESP array of bulk strings.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse_reply(data: bytes, position: int = 0) -> Tuple[RespValue, int]:
    """
    Parse one RESP2 reply starting at C{position}: simple strings and bulk strings become
    bytes (a null bulk string or array None), integers int, arrays lists, and error replies
    L{RedisReplyError} values. Returns the reply and the position after it.

    @raise _Incomplete: C{data} ends before the reply does.
    @raise RespProtocolError: the bytes are not RESP.
    """
    end = data.find(b"\r\n", position)
    if end < 0:
        raise _Incomplete()
    kind, line, after = data[position : position + 1], data[position + 1 : end], end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisReplyError(line.decode("utf-8", "replace")), after
    try:
        number = int(line)
    except ValueError:
        raise RespProtocolError(f"bad RESP line {data[position:end]!r}") from None
    if kind == b":":
        return number, after
    if kind == b"$":
        if number < 0:
            return None, after
        if len(data) < after + number + 2:
            raise _Incomplete()
        if data[after + number : after + number + 2] != b"\r\n":
            raise RespProtocolError("bulk string not followed by CRLF")
        return data[after : after + number], after + number + 2
    if kind == b"*":
        if number < 0:
            return None, after
        items: List[Any] = []
        for _ in range(number):
            item, after = parse_reply(data, after)
            items.append(item)
        return items, after
    raise RespProtocolError(f"unknown RESP type {kind!r}")


class _RespConnection(Protocol):
    """
    One connection to Redis: commands are pipelined and their replies delivered in order.

    @ivar closed: fires when the connection is closed.
    """

    def __init__(self, opened: Set[_RespConnection], lost: Callable[[_RespConnection], None]):
        self._opened = opened
        self._lost = lost
        self._buffer = b""
        self._pending: Deque[defer.Deferred[Any]] = deque()
        self._gone: Optional[str] = None
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self._opened.add(self)

    def send(self, args: Sequence[bytes]) -> defer.Deferred[Any]:
        """
        Send one command; the Deferred fires with its reply, or fails with
        L{RedisReplyError} or L{RedisUnavailable}.
        """
        if self._gone is not None:
            return defer.fail(RedisUnavailable(self._gone))
        reply: defer.Deferred[Any] = defer.Deferred()
        self._pending.append(reply)
        self.transport.write(encode_command(args))  # type: ignore[union-attr]
        return reply

    def abort(self) -> None:
        """Drop the connection now; pending commands fail."""
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data
        position = 0
        while position < len(buffer):
            try:
                value, position = parse_reply(buffer, position)
            except _Incomplete:
                break
            except RespProtocolError as e:
                self._buffer = b""
                self._gone = f"Redis protocol error: {e}"
                self.abort()
                return
            if not self._pending:
                self._gone = "Redis sent a reply nobody asked for"
                self.abort()
                return
            waiting = self._pending.popleft()
            if isinstance(value, RedisReplyError):
                waiting.errback(value)
            else:
                waiting.callback(value)
        self._buffer = buffer[position:]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._gone is None:
            self._gone = f"connection to Redis lost: {reason.getErrorMessage()}"
        pending, self._pending = self._pending, deque()
        for waiting in pending:
            waiting.errback(RedisUnavailable(self._gone))
        self._opened.discard(self)
        self._lost(self)
        self.closed.callback(None)


class _ConnectionFactory(Factory):
    def __init__(self, opened: Set[_RespConnection], lost: Callable[[_RespConnection], None]):
        self._opened = opened
        self._lost = lost

    def buildProtocol(self, addr: Any) -> _RespConnection:
        return _RespConnection(self._opened, self._lost)


class RedisClient:
    """
    A lazy, persistent, reconnecting connection to one Redis server.

    @ivar timeout: seconds a command (or a connection attempt with its handshake) may take.
    @ivar reconnect_delay: seconds commands fail at once after a failed connection attempt.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        username: Optional[str] = None,
        password: Optional[str] = None,
        db: int = 0,
        timeout: float = CALL_TIMEOUT,
        reconnect_delay: float = RECONNECT_DELAY,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._handshake_commands: List[Tuple[bytes, ...]] = []
        if password is not None:
            credentials = (username, password) if username else (password,)
            self._handshake_commands.append((b"AUTH", *(c.encode("utf-8") for c in credentials)))
        if db:
            self._handshake_commands.append((b"SELECT", b"%d" % db))
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self._connection: Optional[_RespConnection] = None
        self._handshaking: Optional[_RespConnection] = None
        self._attempt: Optional[defer.Deferred[Any]] = None
        self._waiting: List[Tuple[Sequence[bytes], defer.Deferred[Any], List[_RespConnection]]] = []
        self._opened: Set[_RespConnection] = set()
        self._retry_at = 0.0
        self._last_error = ""
        self._stopped = False

    def execute(self, *args: bytes) -> defer.Deferred[Any]:
        """
        Run one command: the Deferred fires with the reply, or fails with L{RedisReplyError}
        (an error reply) or L{RedisUnavailable} (no connection, connection lost, timed out).
        """
        if self._stopped:
            return defer.fail(RedisUnavailable("the Redis client is stopped"))
        result: defer.Deferred[Any] = defer.Deferred()
        sent_on: List[_RespConnection] = []
        connection = self._connection
        if connection is not None:
            self._send(connection, args, result, sent_on)
        elif self._reactor.seconds() < self._retry_at:
            return defer.fail(RedisUnavailable(self._last_error))
        else:
            self._waiting.append((args, result, sent_on))
            self._connect()
        result.addTimeout(self.timeout, self._reactor)
        return result.addErrback(self._timed_out, sent_on)

    def _send(
        self,
        connection: _RespConnection,
        args: Sequence[bytes],
        result: defer.Deferred[Any],
        sent_on: List[_RespConnection],
    ) -> None:
        def deliver(outcome: Any) -> None:
            # The caller may have given up (timeout, cancellation): the reply is dropped.
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

        sent_on.append(connection)
        connection.send(args).addBoth(deliver)

    def _timed_out(self, failure: Failure, sent_on: List[_RespConnection]) -> Failure:
        if not failure.check(defer.TimeoutError):
            return failure
        # A command that timed out leaves its connection unusable (the reply would arrive out
        # of turn, or never from a hung Redis): drop it so that the next command reconnects.
        for connection in sent_on:
            if connection is self._connection:
                connection.abort()
        return Failure(RedisUnavailable(f"Redis did not answer within {self.timeout:g}s"))

    def _connect(self) -> None:
        if self._attempt is not None:
            return
        attempt: defer.Deferred[Any] = self._endpoint.connect(
            _ConnectionFactory(self._opened, self._lost)
        )
        # Set before the callbacks, which may run at once and clear it.
        self._attempt = attempt
        attempt.addCallback(self._handshake)
        attempt.addTimeout(self.timeout, self._reactor)
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _handshake(self, connection: _RespConnection) -> defer.Deferred[_RespConnection]:
        """AUTH and SELECT, one after the other; fires with the connection once done."""
        self._handshaking = connection
        commands = list(self._handshake_commands)

        def next_step(_: object) -> Any:
            if not commands:
                return connection
            return connection.send(commands.pop(0)).addCallback(next_step)

        done: defer.Deferred[_RespConnection] = defer.maybeDeferred(next_step, None)
        return done

    def _connected(self, connection: _RespConnection) -> None:
        self._attempt = self._handshaking = None
        if self._stopped:
            connection.abort()
            return
        self._connection = connection
        waiting, self._waiting = self._waiting, []
        for args, result, sent_on in waiting:
            if not result.called:
                self._send(connection, args, result, sent_on)

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._handshaking is not None:
            self._handshaking.abort()
            self._handshaking = None
        if failure.check(defer.TimeoutError, defer.CancelledError):
            message = f"connecting to Redis timed out after {self.timeout:g}s"
        elif failure.check(RedisReplyError):
            message = f"Redis refused the connection handshake: {failure.getErrorMessage()}"
        else:
            message = f"cannot connect to Redis: {failure.getErrorMessage()}"
        self._last_error = message
        self._retry_at = self._reactor.seconds() + self.reconnect_delay
        waiting, self._waiting = self._waiting, []
        for _, result, _ in waiting:
            if not result.called:
                result.errback(RedisUnavailable(message))

    def _lost(self, connection: _RespConnection) -> None:
        if connection is self._connection:
            self._connection = None

    def stop(self) -> defer.Deferred[None]:
        """
        Close the connection (and any being made); fires once they are closed.
        """
        self._stopped = True
        if self._attempt is not None:
            self._attempt.cancel()
        if self._connection is not None:
            self._connection.transport.loseConnection()  # type: ignore[union-attr]
        closing = [connection.closed for connection in self._opened]
        return defer.gatherResults(closing).addCallback(lambda _: None)


@attr.s(frozen=True, auto_attribs=True)
class RedisAddress:
    """
    Where Redis is and how to log in, from a ``redis_url``.

    @ivar scheme: ``redis``, ``rediss`` (TLS) or ``unix``.
    @ivar host: the host name or IP address (``redis``/``rediss``).
    @ivar port: the port (default 6379).
    @ivar path: the socket path (``unix``).
    @ivar username: the ACL user, if any.
    @ivar password: the password, if any.
    @ivar db: the database number.
    """

    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    username: Optional[str] = None
    password: Optional[str] = None
    db: int = 0


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read ``redis://[[user]:password@]host[:port][/db]``, the same with ``rediss://`` (TLS), or
    ``unix://[[user]:password@]/path/to/socket[?db=N]``.

    @raise ValueError: the URL does not say where Redis is or its database is not a number.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is None and "password" in query:
        password = query["password"][0]
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"redis_url '{url}' has no socket path")
        db_text = query.get("db", ["0"])[0]
        return RedisAddress(
            "unix",
            path=parts.path,
            username=username,
            password=password,
            db=_db_number(url, db_text),
        )
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"redis_url '{url}' is not redis://host[:port][/db]")
    db_text = parts.path.strip("/") or query.get("db", ["0"])[0]
    return RedisAddress(
        parts.scheme,
        host=parts.hostname,
        port=parts.port or 6379,
        username=username,
        password=password,
        db=_db_number(url, db_text),
    )


def _db_number(url: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"redis_url '{url}': database '{text}' is not a number")
    return int(text)


def endpoint_for(reactor: Any, address: RedisAddress, timeout: float) -> IStreamClientEndpoint:
    """
    The client endpoint on C{reactor} that reaches C{address}.
    """
    if address.scheme == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    endpoint: IStreamClientEndpoint
    try:
        literal = ipaddress.ip_address(address.host)
    except ValueError:
        endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    else:
        tcp = TCP4ClientEndpoint if literal.version == 4 else TCP6ClientEndpoint
        endpoint = tcp(reactor, address.host, address.port, timeout=timeout)
    if address.scheme == "rediss":
        endpoint = wrapClientTLS(optionsForClientTLS(address.host), endpoint)
    return endpoint


BUCKET_SCRIPT = b"""
-- KEYS[1]: the bucket hash. ARGV: rate (tokens/s), burst, TTL in seconds (0: none).
-- Returns {allowed (1/0), tokens left (as text, exact)}.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
if redis.replicate_commands then
  -- Redis < 5 replicates scripts verbatim and refuses writes after TIME without this.
  redis.replicate_commands()
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'last_refill')
local tokens = tonumber(bucket[1])
local last = tonumber(bucket[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
end
if now > last and rate > 0 then
  tokens = math.min(burst, tokens + (now - last) * rate)
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'last_refill', string.format('%.17g', now))
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return {allowed, string.format('%.17g', tokens)}
"""
"""The atomic token-bucket step, on Redis's clock."""

BUCKET_SCRIPT_SHA = hashlib.sha1(BUCKET_SCRIPT).hexdigest().encode("ascii")


def run_script(
    client: RedisClient, script: bytes, sha: bytes, keys: Sequence[bytes], args: Sequence[bytes]
) -> defer.Deferred[Any]:
    """
    EVALSHA the script, and EVAL it (which also loads it) when Redis does not know it yet.
    """
    tail = (b"%d" % len(keys), *keys, *args)

    def load(failure: Failure) -> Any:
        error = failure.value
        if isinstance(error, RedisReplyError) and error.message.startswith("NOSCRIPT"):
            return client.execute(b"EVAL", script, *tail)
        return failure

    return client.execute(b"EVALSHA", sha, *tail).addErrback(load)


def bucket_ttl(rate: int, burst: int) -> int:
    """
    ``ceil(burst/rate) + 10`` seconds (capped at L{MAX_TTL}); 0 (no expiry) when C{rate} is 0,
    since such a bucket never refills.
    """
    if rate <= 0:
        return 0
    return min(MAX_TTL, -(-burst // rate) + 10)


_UNAVAILABLE: Reply = json_reply(503, "Rate limiter unavailable")


class RedisRateLimit(Middleware):
    """
    Token buckets in Redis for one router pipeline.

    @ivar client: the Redis connection.
    """

    def __init__(
        self,
        name: str,
        router: str,
        client: RedisClient,
        rate: int,
        burst: int,
        key_of: KeyFunction,
        deny_on_error: bool,
    ) -> None:
        Middleware.__init__(self, name)
        self.client = client
        self._prefix = f"a3s:ratelimit:{router}:".encode()
        self._rate = rate
        self._burst = burst
        self._args = (b"%d" % rate, b"%d" % burst, b"%d" % bucket_ttl(rate, burst))
        self._key_of = key_of
        self._deny_on_error = deny_on_error
        self._failing = False

    def redis_key(self, ctx: RequestContext) -> bytes:
        """
        The Redis key of the request's bucket: ``a3s:ratelimit:<router>:<key>``.
        """
        return self._prefix + self._key_of(ctx).encode("utf-8")

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Ask Redis for a token; answer 429 when there is none, and follow C{on_redis_error} when
        Redis fails.
        """
        asking = run_script(
            self.client, BUCKET_SCRIPT, BUCKET_SCRIPT_SHA, (self.redis_key(ctx),), self._args
        )
        return asking.addCallbacks(self._decided, self._failed, callbackArgs=(ctx,))

    def _decided(self, reply: Any, ctx: RequestContext) -> Optional[Reply]:
        try:
            allowed, tokens = int(reply[0]), float(reply[1])
            if not math.isfinite(tokens):
                raise ValueError(tokens)
            decision = Decision.of(allowed == 1, tokens, self._rate, self._burst)
        except (TypeError, ValueError, IndexError, KeyError, OverflowError):
            return self._failed(Failure(RespProtocolError(f"unexpected script reply {reply!r}")))
        if self._failing:
            self._failing = False
            _LOG.info("Rate limiter {name}: Redis is answering again", name=self.name)
        if not decision.allowed:
            return decision.rejection("Rate limit exceeded (distributed)")
        ctx.notes[self.name] = decision
        return None

    def _failed(self, failure: Failure) -> Optional[Reply]:
        if failure.check(defer.CancelledError):
            # Whoever waited for this request is gone; nothing about Redis is known.
            return None
        if not self._failing:
            # Once per outage, not once per request.
            self._failing = True
            _LOG.warn(
                "Rate limiter {name}: Redis failed ({error}); requests are {verdict} until it "
                "answers",
                name=self.name,
                error=failure.getErrorMessage(),
                verdict="denied" if self._deny_on_error else "allowed",
            )
        return _UNAVAILABLE if self._deny_on_error else None

    def on_response(self, ctx: RequestContext, status: int, headers: Headers) -> None:
        """
        Add the rate-limit headers noted in the request phase to the proxied response.
        """
        decision = ctx.notes.get(self.name)
        if isinstance(decision, Decision):
            decision.add_to(headers)

    def stop(self) -> defer.Deferred[None]:
        """
        Close the Redis connection.
        """
        return self.client.stop()


def build(config: MiddlewareConfig, ctx: BuildContext) -> RedisRateLimit:
    """
    Build from C{redis_url} and C{rate} (required), C{burst} (the rate), C{key}
    (``"client-ip"``) and C{on_redis_error} (``"allow"``). Nothing connects until the first
    request.
    """
    options = config.options
    rate, burst = limits(config)
    address = parse_redis_url(str(options["redis_url"]))
    client = RedisClient(
        ctx.reactor,
        endpoint_for(ctx.reactor, address, CALL_TIMEOUT),
        username=address.username,
        password=address.password,
        db=address.db,
    )
    return RedisRateLimit(
        config.name,
        ctx.router,
        client,
        rate,
        burst,
        key_function(str(options.get("key", "client-ip"))),
        options.get("on_redis_error", "allow") == "deny",
    )
