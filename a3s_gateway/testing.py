# -*- test-case-name: tests.test_testing -*-
"""
Stand-in upstreams for tests: for users testing an application that embeds a3s-gateway, and for
the gateway's own end-to-end tests.

Every stand-in is a plain ``twisted.web`` leaf resource, so it runs in memory under
``treq.testing.StubTreq`` or on a real loopback socket through :func:`listen_backend`. Each one
answers with an ``X-Backend: <name>`` header so a test can tell which backend served a request.
Anything that waits takes its clock (an ``IReactorTime``) as an argument, so a
``twisted.internet.task.Clock`` drives it in tests.

- :class:`EchoResource`: reports the request it received as JSON; query switches pick the status,
  a large body or a redirect.
- :class:`StreamingChatResource`: an OpenAI-style chat completions server that streams its answer
  as server-sent events, one token per tick.
- :class:`SlowResource`, :class:`StallingResource`, :class:`FailingResource`,
  :class:`DropResource`: upstream misbehaviour (late headers, a body that stops, error statuses,
  a connection cut mid-response).
- :func:`listen_backend` serves a resource on an ephemeral loopback port; its
  :meth:`BackendServer.stop` also closes connections still open, so trial sees a clean reactor.
- :func:`unused_tcp_port` gives a port nothing listens on, for connection-refused tests.
"""

from __future__ import annotations

import json
import socket
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs

import attr
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

DEMO_MODEL = "a3s-demo"
"""The model id :class:`StreamingChatResource` lists and answers as by default."""

_FILL_CHUNK = b"x" * 65536
_JSON = b"application/json"


def _set_common_headers(request: Request, name: str, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"x-backend", name.encode("utf-8"))


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload).encode("utf-8")


def _render_json(request: Request, name: str, code: int, payload: object) -> bytes:
    """
    Set up a JSON answer and return the bytes for ``render`` to send.

    A HEAD answer carries the GET answer's Content-Length and no body; returning the body would
    make twisted.web log a warning for every HEAD.
    """
    body = _json_bytes(payload)
    request.setResponseCode(code)
    _set_common_headers(request, name, _JSON)
    if request.method == b"HEAD":
        request.setHeader(b"content-length", b"%d" % (len(body),))
        return b""
    return body


def _finish_json(request: Request, name: str, code: int, payload: object) -> None:
    """Send a whole JSON answer now, for requests answered after ``render`` returned."""
    body = _json_bytes(payload)
    request.setResponseCode(code)
    _set_common_headers(request, name, _JSON)
    request.setHeader(b"content-length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


def _read_body(request: Request) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read()
    return body


def _raw_target(request: Request) -> Tuple[bytes, bytes]:
    """The request target split into the raw path and the raw query (without ``?``)."""
    path, _, query = request.uri.partition(b"?")
    return path, query


def _latin1(data: bytes) -> str:
    """Bytes as text, one character per byte, so ``.encode("latin-1")`` gives them back."""
    return data.decode("latin-1")


def _int_param(
    params: Mapping[bytes, Sequence[bytes]], key: bytes, low: int, high: Optional[int]
) -> Optional[int]:
    values = params.get(key)
    if not values:
        return None
    raw = values[-1]
    value = int(raw) if raw.isdigit() else -1
    if value < low or (high is not None and value > high):
        limit = f"between {low} and {high}" if high is not None else f"of at least {low}"
        raise ValueError(
            f"query parameter '{_latin1(key)}' must be an integer {limit}, got '{_latin1(raw)}'"
        )
    return value


@implementer(IPushProducer)
class _FillerBody:
    """
    Writes ``size`` bytes of ``x`` in 64 KiB chunks, honouring backpressure.

    A push producer, so a slow reader pauses it and memory stays flat however large the body.
    """

    def __init__(self, request: Request, size: int) -> None:
        self._request = request
        self._remaining = size
        self._paused = False
        self._stopped = False
        self._writing = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._client_gone)
        self._write()

    def _write(self) -> None:
        # write() may pause us (or resumeProducing may call back in) re-entrantly; the outer
        # loop notices through the flags.
        if self._writing:
            return
        self._writing = True
        try:
            while self._remaining and not self._paused and not self._stopped:
                n = min(self._remaining, len(_FILL_CHUNK))
                self._remaining -= n
                self._request.write(_FILL_CHUNK[:n])
        finally:
            self._writing = False
        if not self._remaining and not self._stopped:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish()

    def _client_gone(self, reason: Failure) -> None:
        self._stopped = True

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        self._stopped = True


class EchoResource(Resource):
    """
    Answers any method on any path with a JSON description of the request it received.

    The answer is ``200 application/json``::

        {"backend": name, "method": "POST", "path": "/raw/path", "query": "a=1",
         "headers": [["Host", "..."], ...], "body": "...", "body_bytes": 3}

    ``path``, ``query``, ``method`` and header names and values are the raw bytes decoded as
    ISO-8859-1 (``.encode("latin-1")`` gives the exact bytes back). ``headers`` lists each value
    as its own pair, repeats kept, in the order twisted.web keeps them: names in the order first
    seen (with twisted.web's canonical capitalisation), the values of one name together. ``body``
    is the request body decoded as UTF-8 with replacement; ``body_bytes`` its length in bytes.

    ``GET /health`` answers ``{"status": "ok"}``. Query switches (combinable):

    - ``status=NNN`` (200-599): answer with that status;
    - ``size=N``: answer N bytes of ``x`` as ``application/octet-stream`` with a Content-Length,
      written in chunks under backpressure (for big-body and slow-client tests);
    - ``redirect=URL``: answer 302 (or ``status``) with ``Location: URL``.

    A malformed switch answers 400 with ``{"error": "..."}``.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Request) -> Union[bytes, int]:
        path, query = _raw_target(request)
        if path == b"/health" and request.method in (b"GET", b"HEAD"):
            return _render_json(request, self.name, 200, {"status": "ok"})
        params: Dict[bytes, List[bytes]] = parse_qs(query, keep_blank_values=True)
        try:
            status = _int_param(params, b"status", 200, 599)
            size = _int_param(params, b"size", 0, None)
        except ValueError as e:
            return _render_json(request, self.name, 400, {"error": str(e), "backend": self.name})
        redirect = params.get(b"redirect")
        if redirect:
            request.setHeader(b"location", redirect[-1])
            code = 302 if status is None else status
            target = {"backend": self.name, "redirect": _latin1(redirect[-1])}
            return _render_json(request, self.name, code, target)
        code = 200 if status is None else status
        if size is not None:
            request.setResponseCode(code)
            _set_common_headers(request, self.name, b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % (size,))
            if request.method == b"HEAD":
                return b""
            _FillerBody(request, size).start()
            return NOT_DONE_YET
        body = _read_body(request)
        headers = [
            [_latin1(name), _latin1(value)]
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        payload: Dict[str, object] = {
            "backend": self.name,
            "method": _latin1(request.method),
            "path": _latin1(path),
            "query": _latin1(query),
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
            "body_bytes": len(body),
        }
        return _render_json(request, self.name, code, payload)


def reply_tokens(name: str, text: str) -> Tuple[str, ...]:
    """
    The tokens :class:`StreamingChatResource` named ``name`` answers to the user text ``text``.

    The reply is ``"Hello from <name>! You said: <text>"`` cut into words, each word after the
    first carrying its leading space, so that ``"".join(tokens)`` is the reply exactly.
    """
    words = f"Hello from {name}! You said: {text}".split(" ")
    return (words[0], *(" " + word for word in words[1:]))


def _openai_error(message: str) -> Dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def _message_text(content: object) -> str:
    """The text of a message's ``content``: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: List[object]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message.get("content"))
    return ""


@attr.s(frozen=True, auto_attribs=True)
class _Completion:
    """What one chat request is answered with."""

    id: str
    model: str
    created: int
    tokens: Tuple[str, ...]
    prompt_words: int

    def chunk(self, index: int) -> bytes:
        """The server-sent event carrying token ``index`` as a ``chat.completion.chunk``."""
        delta = {"content": self.tokens[index]}
        if index == 0:
            delta = {"role": "assistant", **delta}
        last = index == len(self.tokens) - 1
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None}],
        }
        return b"data: " + _json_bytes(payload) + b"\n\n"

    def whole(self) -> Dict[str, object]:
        """The non-streamed ``chat.completion`` object."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.tokens)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": self.prompt_words,
                "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_words + len(self.tokens),
            },
        }


class _TokenStream:
    """Writes one completion's tokens as server-sent events, one every ``interval`` seconds."""

    def __init__(
        self,
        request: Request,
        name: str,
        clock: IReactorTime,
        interval: float,
        completion: _Completion,
    ) -> None:
        self._request = request
        self._name = name
        self._clock = clock
        self._interval = interval
        self._completion = completion
        self._next_index = 0
        self._call: Optional[IDelayedCall] = None

    def start(self) -> None:
        _set_common_headers(self._request, self._name, b"text/event-stream")
        self._request.setHeader(b"cache-control", b"no-cache")
        # Headers go out now, as a real LLM server sends them before its first token.
        self._request.write(b"")
        self._request.notifyFinish().addErrback(self._client_gone)
        self._call = self._clock.callLater(self._interval, self._send_next)

    def _send_next(self) -> None:
        index = self._next_index
        self._next_index += 1
        self._request.write(self._completion.chunk(index))
        if self._next_index < len(self._completion.tokens):
            self._call = self._clock.callLater(self._interval, self._send_next)
            return
        self._call = None
        self._request.write(b"data: [DONE]\n\n")
        self._request.finish()

    def _client_gone(self, reason: Failure) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class StreamingChatResource(Resource):
    """
    An OpenAI-style chat completions server, named ``name``, for streaming tests.

    - ``POST /v1/chat/completions`` with a JSON object holding ``messages``: the reply is
      :func:`reply_tokens` of the last user message. With ``"stream": true`` it answers
      ``text/event-stream`` at once, then writes one ``data: {chat.completion.chunk}`` event per
      token every ``token_interval`` seconds on ``clock`` (the first after one interval), then
      ``data: [DONE]``; a client that disconnects stops the stream. Otherwise it answers the
      whole ``chat.completion`` object (``usage`` counts words). ``model`` is echoed, or
      :data:`DEMO_MODEL` when absent. A body that is not such JSON answers 400 with an
      OpenAI-style ``{"error": {"message": ...}}``.
    - ``GET /v1/models`` lists :data:`DEMO_MODEL`; ``GET /health`` answers ``{"status": "ok"}``.
    - Other paths answer 404, other methods 405, both as JSON.
    """

    isLeaf = True

    def __init__(self, name: str, clock: IReactorTime, token_interval: float = 0.02) -> None:
        super().__init__()
        self.name = name
        self._clock = clock
        self._token_interval = token_interval
        self._completions = 0

    def render(self, request: Request) -> Union[bytes, int]:
        path, _ = _raw_target(request)
        if path == b"/v1/chat/completions":
            if request.method != b"POST":
                return self._not_allowed(request, b"POST")
            return self._chat(request)
        if path in (b"/v1/models", b"/health"):
            if request.method not in (b"GET", b"HEAD"):
                return self._not_allowed(request, b"GET, HEAD")
            if path == b"/health":
                return _render_json(request, self.name, 200, {"status": "ok"})
            model = {"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": self.name}
            models = {"object": "list", "data": [model]}
            return _render_json(request, self.name, 200, models)
        message = f"Unknown path {_latin1(path)}"
        return _render_json(request, self.name, 404, _openai_error(message))

    def _not_allowed(self, request: Request, allow: bytes) -> bytes:
        request.setHeader(b"allow", allow)
        message = f"Method {_latin1(request.method)} not allowed"
        return _render_json(request, self.name, 405, _openai_error(message))

    def _chat(self, request: Request) -> Union[bytes, int]:
        try:
            body = json.loads(_read_body(request))
        except (ValueError, RecursionError):
            # ValueError covers bad JSON and bad UTF-8; absurd nesting raises RecursionError.
            return _render_json(
                request, self.name, 400, _openai_error("Request body is not valid JSON")
            )
        if not isinstance(body, dict):
            return _render_json(
                request, self.name, 400, _openai_error("Request body must be a JSON object")
            )
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _render_json(
                request, self.name, 400, _openai_error("'messages' must be a list of messages")
            )
        text = _last_user_text(messages)
        model = body.get("model")
        self._completions += 1
        completion = _Completion(
            id=f"chatcmpl-{self.name}-{self._completions}",
            model=model if isinstance(model, str) else DEMO_MODEL,
            created=int(self._clock.seconds()),
            tokens=reply_tokens(self.name, text),
            prompt_words=len(text.split()),
        )
        if body.get("stream") is True:
            _TokenStream(request, self.name, self._clock, self._token_interval, completion).start()
            return NOT_DONE_YET
        return _render_json(request, self.name, 200, completion.whole())


class SlowResource(Resource):
    """
    Answers ``200 {"backend": name, "delay": delay}`` only ``delay`` seconds (on ``clock``) after
    the request arrived; nothing, not even the headers, is sent before. A client that leaves
    first cancels the pending answer.
    """

    isLeaf = True

    def __init__(self, clock: IReactorTime, delay: float, name: str = "slow") -> None:
        super().__init__()
        self.name = name
        self._clock = clock
        self._delay = delay

    def render(self, request: Request) -> int:
        payload = {"backend": self.name, "delay": self._delay}
        call = self._clock.callLater(self._delay, _finish_json, request, self.name, 200, payload)

        def client_gone(reason: Failure) -> None:
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(client_gone)
        return NOT_DONE_YET


class StallingResource(Resource):
    """
    Sends ``200`` headers (chunked ``text/plain``) and a first chunk ``first chunk from <name>``,
    then nothing more, ever: for idle-timeout tests. The response ends only when the connection
    does (:meth:`BackendServer.stop` closes it).
    """

    isLeaf = True

    def __init__(self, name: str = "stalling") -> None:
        super().__init__()
        self.name = name

    def render(self, request: Request) -> int:
        _set_common_headers(request, self.name, b"text/plain")
        request.write(f"first chunk from {self.name}\n".encode())
        return NOT_DONE_YET


class FailingResource(Resource):
    """Always answers ``status`` with ``{"error": "<name> always answers <status>", "backend"}``."""

    isLeaf = True

    def __init__(self, status: int, name: str = "failing") -> None:
        super().__init__()
        if not 200 <= status <= 599:
            raise ValueError(f"status must be between 200 and 599, got {status}")
        self.name = name
        self._status = status

    def render(self, request: Request) -> bytes:
        payload = {"error": f"{self.name} always answers {self._status}", "backend": self.name}
        return _render_json(request, self.name, self._status, payload)


DROP_BODY = b"partial body"
"""The bytes :class:`DropResource` sends before closing the connection."""
DROP_CLAIMED_LENGTH = 1024
"""The Content-Length :class:`DropResource` announces, more than it sends."""


class DropResource(Resource):
    """
    Closes the connection in the middle of its answer.

    It sends ``200`` headers announcing ``Content-Length: 1024``, then the 12 bytes of
    :data:`DROP_BODY`, then closes the connection: a client must see a truncated body, never a
    complete one. With ``send_headers=False`` it closes without answering anything (an upstream
    that dies before its response starts).
    """

    isLeaf = True

    def __init__(self, name: str = "drop", send_headers: bool = True) -> None:
        super().__init__()
        self.name = name
        self._send_headers = send_headers

    def render(self, request: Request) -> int:
        if self._send_headers:
            _set_common_headers(request, self.name, b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % (DROP_CLAIMED_LENGTH,))
            request.write(DROP_BODY)
        # loseConnection, not abortConnection: what was written must reach the client first.
        channel = request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()
        return NOT_DONE_YET


class _QuietSite(Site):
    """A Site without access log lines or factory start/stop messages."""

    noisy = False
    displayTracebacks = False

    def startFactory(self) -> None:
        """
        Nothing to set up: with no access log there is no file to open and no need for
        HTTPFactory's once-a-second log timestamp timer (one less delayed call in tests).
        """

    def log(self, request: http.Request) -> None:
        """Access logging is off: stand-in backends would only add noise to test logs."""


def quiet_site(resource: IResource, reactor: IReactorTime) -> Site:
    """
    A ``Site`` serving ``resource`` with access logging, factory messages and traceback pages
    off, its connection timeouts on ``reactor``.
    """
    return _QuietSite(resource, reactor=reactor)


class _ConnectionTracker(WrappingFactory, ServerFactory):
    """Wraps a server factory and keeps its open connections, so they can all be closed."""

    noisy = False

    def __init__(self, factory: Site) -> None:
        super().__init__(factory)
        self._waiting: List[Deferred[None]] = []

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def abort_all(self) -> Deferred[None]:
        """Abort every open connection; fires once all of them are gone."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


@attr.s(frozen=True, auto_attribs=True)
class BackendServer:
    """A resource served on a loopback port by :func:`listen_backend`."""

    port: int
    url: str
    """``http://<interface>:<port>``, with no trailing slash."""
    _listening: IListeningPort = attr.ib(repr=False)
    _connections: _ConnectionTracker = attr.ib(repr=False)

    def stop(self) -> Deferred[None]:
        """
        Stop listening, then abort the connections still open (idle keep-alive connections,
        unfinished responses); fires when the port and all of them are closed.
        """

        def close_connections(_: object) -> Deferred[None]:
            return self._connections.abort_all()

        return maybeDeferred(self._listening.stopListening).addCallback(close_connections)


def listen_backend(
    reactor: IReactorTCP, resource: IResource, interface: str = "127.0.0.1"
) -> BackendServer:
    """
    Serve ``resource`` on an ephemeral TCP port of ``interface`` (``reactor`` must also provide
    ``IReactorTime``). Call :meth:`BackendServer.stop` when done, e.g. with ``addCleanup``.
    """
    tracker = _ConnectionTracker(quiet_site(resource, IReactorTime(reactor)))
    listening = reactor.listenTCP(0, tracker, interface=interface)
    address = listening.getHost()
    if not isinstance(address, (IPv4Address, IPv6Address)):
        raise TypeError(f"expected a TCP listening port, got one at {address!r}")
    host = f"[{interface}]" if ":" in interface else interface
    return BackendServer(
        port=address.port,
        url=f"http://{host}:{address.port}",
        listening=listening,
        connections=tracker,
    )


def unused_tcp_port(interface: str = "127.0.0.1") -> int:
    """
    A TCP port on ``interface`` that nothing listened on a moment ago, for connection-refused
    tests (found by binding port 0 and closing the socket again).
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((interface, 0))
        port: int = s.getsockname()[1]
    return port
