"""
The streaming benchmarks' backend (adapted from the team's shared ``sse_backend.py``): a stand-in
LLM server and a large-body server, on asyncio protocols so one process serves thousands of
streams on little CPU.

    GET /stream?n=50&gap_ms=20   text/event-stream, chunked: ``n`` events ``gap_ms`` apart, each
                                 ``data: {"t": <time.time() at send>, "i": k}``
    GET /big?bytes=N             N bytes of application/octet-stream with a Content-Length,
                                 written only as fast as the reader takes them (flow control)
    GET /                        a small fixed body

usage: backend.py PORT   (listens on 127.0.0.1)
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Optional
from urllib.parse import parse_qs, urlsplit

HELLO = b"hello from backend\n"
BLOCK = b"x" * 65536


class Handler(asyncio.Protocol):
    """One client connection: keep-alive requests, answered one at a time."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = b""
        self.busy = False
        self.paused = False
        self.big_left = 0
        self.chunked = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.next_request()

    def next_request(self) -> None:
        if self.busy or b"\r\n\r\n" not in self.buffer:
            return
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        target = request_line[1].decode()
        # An HTTP/1.0 client (Twisted's stock proxy) cannot take chunks: close-delimited instead.
        self.chunked = request_line[2] != b"HTTP/1.0"
        url = urlsplit(target)
        query = parse_qs(url.query)
        assert self.transport is not None
        if url.path == "/stream":
            self.busy = True
            n = int(query.get("n", ["50"])[0])
            gap = int(query.get("gap_ms", ["20"])[0]) / 1000
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                + (
                    b"transfer-encoding: chunked\r\n\r\n"
                    if self.chunked
                    else b"connection: close\r\n\r\n"
                )
            )
            loop = asyncio.get_running_loop()
            start = loop.time()
            # Scheduled against the start, so a late event does not delay the ones after it.
            for i in range(n):
                loop.call_at(start + (i + 1) * gap, self.event, i, i == n - 1)
        elif url.path == "/big":
            self.busy = True
            self.big_left = int(query.get("bytes", [str(200 * 1024 * 1024)])[0])
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"content-length: %d\r\n\r\n" % self.big_left
            )
            self.pump()
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                % (len(HELLO), HELLO)
            )
            self.next_request()

    def event(self, i: int, last: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        ev = b'data: {"t": %.6f, "i": %d}\n\n' % (time.time(), i)
        if not self.chunked:
            self.transport.write(ev)
            if last:
                self.transport.close()
            return
        self.transport.write(b"%x\r\n%s\r\n%s" % (len(ev), ev, b"0\r\n\r\n" if last else b""))
        if last:
            self.busy = False
            self.next_request()

    def pump(self) -> None:
        assert self.transport is not None
        while self.big_left > 0 and not self.paused and not self.transport.is_closing():
            piece = BLOCK if self.big_left >= len(BLOCK) else BLOCK[: self.big_left]
            self.big_left -= len(piece)
            self.transport.write(piece)
        if self.big_left == 0 and self.busy:
            self.busy = False
            self.next_request()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.big_left:
            self.pump()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Handler, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
