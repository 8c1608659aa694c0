"""
Idle-connection benchmark: opens N keep-alive client connections to each row (default 10,000),
each sends one ``GET /``, reads the answer and then stays open and idle. The row's resident memory
(VmRSS) is read after one warm-up request and again once every connection is held; the figure is
the growth divided by N, in KiB per connection. Connections the row closed before the end are
reported as dropped. (The gateway's client idle timeout is 60 s; the hold here is far shorter.)

The fd limit is raised as far as the hard limit allows before anything starts, and the rows
inherit it.

usage: idle.py [--connections 10000] [--hold 3] [--python PY]
               [--rows gateway,hello,stock,nginx,haproxy]
Ports: 127.0.0.1:9330-9335.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

BACKEND, GATEWAY, HELLO, STOCK, NGINX, HAPROXY = 9331, 9330, 9332, 9333, 9334, 9335


class Idle(asyncio.Protocol):
    """One connection: one request, then idle; remembers whether it was answered or closed."""

    def __init__(self) -> None:
        self.answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.answered.done() and b"\r\n\r\n" in self.buf and self.buf.endswith(b"\n"):
            self.answered.set_result(self.buf.startswith(b"HTTP/1.1 200"))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        if not self.answered.done():
            self.answered.set_result(False)


async def hold(port: int, pid: int, n: int, seconds: float) -> tuple[int, int, int, int]:
    """Open ``n`` idle connections; return (RSS before KiB, RSS after KiB, held, failed)."""
    loop = asyncio.get_running_loop()
    warm = await loop.create_connection(Idle, "127.0.0.1", port)
    await asyncio.wait_for(warm[1].answered, 10)
    warm[0].close()
    await asyncio.sleep(0.5)
    before = harness.rss_kb(pid)
    conns: List[Idle] = []
    failed = 0
    # Open in batches, so that the listen backlog is never the limit.
    for start in range(0, n, 500):
        batch = []
        for _ in range(min(500, n - start)):
            batch.append(loop.create_connection(Idle, "127.0.0.1", port))
        for outcome in await asyncio.gather(*batch, return_exceptions=True):
            if isinstance(outcome, BaseException):
                failed += 1
            else:
                conns.append(outcome[1])
        await asyncio.gather(
            *(asyncio.wait_for(asyncio.shield(c.answered), 30) for c in conns[-len(batch) :]),
            return_exceptions=True,
        )
    await asyncio.sleep(seconds)
    after = harness.rss_kb(pid)
    held = sum(1 for c in conns if not c.closed and c.answered.done() and c.answered.result())
    for c in conns:
        c.transport.close()
    await asyncio.sleep(0.5)
    return before, after, held, failed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--python", default=os.environ.get("PY", sys.executable))
    parser.add_argument("--rows", default="gateway,hello,stock,nginx,haproxy")
    parser.add_argument(
        "--label",
        default=os.environ.get("BENCH_LABEL", ""),
        help="suffix for the RESULT rows, e.g. PyPy",
    )
    args = parser.parse_args()
    fds = harness.raise_fd_limit()
    wanted = args.rows.split(",")
    if args.label:
        os.environ["BENCH_LABEL"] = args.label
    procs = harness.Processes(args.python)
    procs.start(
        "backend", BACKEND, [sys.executable, os.path.join(harness.HERE, "backend.py"), str(BACKEND)]
    )
    print(
        f"idle: {args.connections} keep-alive connections, one GET / each, held {args.hold:g} s; "
        f"Python rows on {harness.interpreter_label(args.python)}; fd limit {fds}"
    )
    print(
        f"{'row':<24} {'held':>7} {'failed':>7} {'RSS before MB':>14} {'RSS after MB':>13}"
        f" {'KiB/conn':>9}"
    )
    starters = [
        ("gateway", "gateway", lambda: procs.gateway(GATEWAY, BACKEND), GATEWAY),
        ("hello", "hello", lambda: procs.hello(HELLO), HELLO),
        ("stock", "stock", lambda: procs.stock(STOCK, BACKEND), STOCK),
        ("nginx", "nginx", lambda: procs.nginx_proxy(NGINX, BACKEND), NGINX),
        ("haproxy", "haproxy", lambda: procs.haproxy(HAPROXY, BACKEND), HAPROXY),
    ]
    for name, key, start, port in starters:
        if key not in wanted or (key in ("nginx", "haproxy") and not harness.have(key)):
            continue
        pid = procs.optional(name, start)
        if pid is None:
            continue
        before, after, held, failed = asyncio.run(hold(port, pid, args.connections, args.hold))
        per = (after - before) / max(held, 1)
        print(
            f"{name:<24} {held:>7} {failed:>7} {before / 1024:>14.1f} {after / 1024:>13.1f}"
            f" {per:>9.1f}",
            flush=True,
        )
        harness.result("idle_held", name, held, "connections")
        harness.result("idle_wanted", name, args.connections, "connections")
        harness.result("idle_kib_per_conn", name, per, "KiB")
        procs.stop(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
