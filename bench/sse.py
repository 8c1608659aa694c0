"""
Streaming benchmark: concurrent SSE streams from bench/backend.py (a stand-in LLM server), direct
and through the gateway, Twisted's stock proxy, nginx with ``proxy_buffering off`` and HAProxy
(those two when installed).

Two probes per row, each run ``--repeats`` times (default 5, alternating), against one proxy
process, the rows taking turns (every row's first runs, then every row's second runs, ...):
- MANY concurrent streams (default 1,000): streams lost (fewer events than sent, or an error;
  summed over the runs) and the per-event delay (receive time minus the backend's send time,
  p50/p99);
- 64 concurrent streams: time to first event beyond the backend's own gap (p50/p99).
Each delay figure is the median of the runs' figures: on a shared 2-core machine one run's p99 or
first-event p50 varies up to fivefold, and the median of five keeps two noisy runs from deciding.
Each run's figures are recorded too (``<measure>_runs`` lines), and bench/summary.py compares two
rows by the median of their rounds' differences: a slow patch of the machine that delays both
rows in one round then leaves their difference alone.
Before them every row gets a short unmeasured run (16 streams), and with ``--warmup-runs N`` also N
unmeasured passes of both probes at full size, whose figures are printed but not counted: PyPy's
JIT is still compiling the gateway's streaming path through the first thousands of streams.

The probe is an asyncio protocol (one process, no threads) that de-chunks and parses the events;
it shares the 2 cores with the backend and the proxy, so compare rows of one run.

With ``--pinned-runs N`` the first-event probe then runs N more times against the gateway and
nginx (rows taking turns) with each proxy on a CPU of its own and the probe and the backend on
another (Linux, two CPUs or more), then every process gets all CPUs back. On two cores shared by
the three, a proxy that spends more CPU per stream also waits longer for the others: this tells
that wait from the proxy's own delay. It is reported, not a target.

usage: sse.py [--streams 1000] [--events 20] [--gap-ms 100] [--ttfe-streams 64] [--ttfe-events 50]
              [--ttfe-gap-ms 20] [--repeats 5] [--warmup-runs 0] [--pinned-runs 0] [--python PY]
              [--rows gateway,stock,nginx,haproxy]
Ports: 127.0.0.1:9310-9315.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from statistics import median
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

BACKEND, GATEWAY, STOCK, NGINX, HAPROXY = 9311, 9310, 9312, 9313, 9314


class Stats:
    """What the probe collected over one run."""

    def __init__(self) -> None:
        self.ttfe: List[float] = []
        self.delays: List[float] = []
        self.complete = 0
        self.errors: List[str] = []


class Stream(asyncio.Protocol):
    """One SSE request: reads the head, de-chunks the body, timestamps each event."""

    def __init__(self, stats: Stats, n: int, gap_ms: int, done: asyncio.Future[None]) -> None:
        self.stats, self.n, self.gap_ms, self.done = stats, n, gap_ms, done
        self.buf = b""
        self.head_done = False
        self.body = b""
        self.got = 0
        self.chunked = True
        self.sent_at = 0.0
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sent_at = time.time()
        transport.write(
            b"GET /stream?n=%d&gap_ms=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Accept: text/event-stream\r\n\r\n" % (self.n, self.gap_ms)
        )

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buf += data
        if not self.head_done:
            if b"\r\n\r\n" not in self.buf:
                return
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.head_done = True
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                self.finish(f"unexpected head: {head[:80]!r}")
                return
            # Twisted's stock proxy answers close-delimited: the body is the bytes until close.
            self.chunked = b"chunked" in head.lower()
        if not self.chunked:
            self.body += self.buf
            self.buf = b""
        # De-chunk everything complete in the buffer.
        ended = False
        while self.chunked:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                break
            size = int(self.buf[:eol].split(b";")[0], 16)
            if size == 0:
                ended = True
                break
            if len(self.buf) < eol + 2 + size + 2:
                break
            self.body += self.buf[eol + 2 : eol + 2 + size]
            self.buf = self.buf[eol + 2 + size + 2 :]
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                break
            event, self.body = self.body[:end], self.body[end + 2 :]
            t = float(event[event.index(b'"t": ') + 5 : event.index(b",")])
            if self.got == 0:
                self.stats.ttfe.append((now - self.sent_at) * 1000 - self.gap_ms)
            self.stats.delays.append((now - t) * 1000)
            self.got += 1
        if ended:
            self.finish(None)

    def finish(self, error: Optional[str]) -> None:
        if self.done.done():
            return
        if error is None and self.got < self.n:
            error = f"only {self.got}/{self.n} events"
        if error is None:
            self.stats.complete += 1
        else:
            self.stats.errors.append(error)
        self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.chunked and exc is None and self.got == self.n:
            self.finish(None)
        self.finish(f"connection lost: {exc!r}")


async def one(port: int, stats: Stats, n: int, gap_ms: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        await loop.create_connection(lambda: Stream(stats, n, gap_ms, done), "127.0.0.1", port)
        await asyncio.wait_for(done, timeout)
    except Exception as e:
        if not done.done():
            stats.errors.append(repr(e))


def probe(port: int, streams: int, n: int, gap_ms: int) -> Stats:
    """Run ``streams`` concurrent streams of ``n`` events against 127.0.0.1:``port``."""
    stats = Stats()
    timeout = 30 + n * gap_ms / 1000 * 3

    async def run() -> None:
        await asyncio.gather(*(one(port, stats, n, gap_ms, timeout) for _ in range(streams)))

    asyncio.run(run())
    return stats


def pct(xs: List[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else float("nan")


def first_event_pinned(
    argv: argparse.Namespace, backend: int, rows: List[Tuple[str, int, int]]
) -> None:
    """
    The time to first event again, with each proxy on a CPU of its own and the probe and the
    backend on another: what the proxy adds when it does not share a CPU with them, as a
    gateway in front of remote backends would not. Rows are (name, port, pid).
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        print("first event, proxy on its own CPU: skipped (needs two CPUs and Linux)")
        return
    load, own = {cpus[0]}, {cpus[1]}
    everything = set(cpus)
    os.sched_setaffinity(0, load)
    os.sched_setaffinity(backend, load)
    for _, _, pid in rows:
        os.sched_setaffinity(pid, own)
    try:
        figures: Dict[str, List[float]] = {name: [] for name, _, _ in rows}
        for _ in range(argv.pinned_runs):
            for name, port, _ in rows:
                few = probe(port, argv.ttfe_streams, argv.ttfe_events, argv.ttfe_gap_ms)
                figures[name].append(pct(few.ttfe, 50))
    finally:
        for pid in [0, backend, *(pid for _, _, pid in rows)]:
            os.sched_setaffinity(pid, everything)
    print(
        f"first event p50 at {argv.ttfe_streams} streams, each proxy on CPU {cpus[1]}, the probe"
        f" and the backend on CPU {cpus[0]} ({argv.pinned_runs} runs each, rows taking turns):"
    )
    for name, values in figures.items():
        print(f"{name:<24} {median(values):>9.2f}   runs: {'/'.join(f'{v:.1f}' for v in values)}")
        harness.result("sse_ttfe_pinned_p50", name, median(values), "ms")
        harness.result("sse_ttfe_pinned_p50_runs", name, values, "ms")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--gap-ms", type=int, default=100)
    parser.add_argument("--ttfe-streams", type=int, default=64)
    parser.add_argument("--ttfe-events", type=int, default=50)
    parser.add_argument("--ttfe-gap-ms", type=int, default=20)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="runs of both probes per row; each figure is the median of the runs' figures",
    )
    parser.add_argument(
        "--warmup-runs",
        type=int,
        default=0,
        help="unmeasured passes of both probes per row before the measured ones (printed)",
    )
    parser.add_argument(
        "--pinned-runs",
        type=int,
        default=0,
        help="then the first-event probe N times more with each proxy on a CPU of its own",
    )
    parser.add_argument("--python", default=os.environ.get("PY", sys.executable))
    parser.add_argument("--rows", default="gateway,stock,nginx,haproxy")
    parser.add_argument(
        "--label",
        default=os.environ.get("BENCH_LABEL", ""),
        help="suffix for the RESULT rows, e.g. PyPy",
    )
    args = parser.parse_args()

    fds = harness.raise_fd_limit()
    procs = harness.Processes(args.python)
    wanted = args.rows.split(",")
    if args.label:
        os.environ["BENCH_LABEL"] = args.label
    print(
        f"SSE: {args.streams} streams x {args.events} events {args.gap_ms} ms apart; "
        f"time to first event: {args.ttfe_streams} streams x {args.ttfe_events} events "
        f"{args.ttfe_gap_ms} ms apart; proxies on {harness.interpreter_label(args.python)}; "
        f"fd limit {fds}"
    )
    backend = procs.start(
        "backend", BACKEND, [sys.executable, os.path.join(harness.HERE, "backend.py"), str(BACKEND)]
    )
    # In measuring order: each row right after the one it is compared with (the gateway after
    # direct for the delays, nginx after the gateway for the first event).
    rows = [("direct", BACKEND)]
    # The processes of the rows compared on a CPU of their own (--pinned-runs).
    pinned: List[Tuple[str, int, int]] = []
    if "gateway" in wanted:
        pinned.append(("gateway", GATEWAY, procs.gateway(GATEWAY, BACKEND)))
        rows.append(("gateway", GATEWAY))
    if "nginx" in wanted and harness.have("nginx"):
        nginx = procs.optional("nginx", lambda: procs.nginx_proxy(NGINX, BACKEND, buffering=False))
        if nginx is not None:
            rows.append(("nginx-unbuffered", NGINX))
            pinned.append(("nginx-unbuffered", NGINX, nginx))
    if "stock" in wanted:
        procs.stock(STOCK, BACKEND)
        rows.append(("stock", STOCK))
    if "haproxy" in wanted and harness.have("haproxy"):
        if procs.optional("haproxy", lambda: procs.haproxy(HAPROXY, BACKEND)):
            rows.append(("haproxy", HAPROXY))

    print(
        f"{'row':<24} {'streams':>8} {'lost':>5} {'delay p50':>10} {'delay p99':>10}"
        f" {'| ttfe p50':>11} {'ttfe p99':>9}   (ms; ttfe at {args.ttfe_streams} streams)"
    )
    # Every row is warmed up first, then measured in rounds, the rows taking turns (every row's
    # first run, then every row's second run, ...), as bench/run.sh does: the machine drifts
    # within minutes, and the rows compared with each other (the gateway and nginx) are then
    # measured seconds apart each time, not minutes apart.
    warmup: Dict[str, List[str]] = {name: [] for name, _ in rows}
    for name, port in rows:
        # A short unmeasured run first: upstream connections open, PyPy's JIT warms up.
        probe(port, 16, 5, 10)
        for _ in range(args.warmup_runs):
            many = probe(port, args.streams, args.events, args.gap_ms)
            few = probe(port, args.ttfe_streams, args.ttfe_events, args.ttfe_gap_ms)
            warmup[name].append(f"{pct(many.delays, 99):.1f}/{pct(few.ttfe, 50):.1f}")
    lost = {name: 0 for name, _ in rows}
    delay_p50: Dict[str, List[float]] = {name: [] for name, _ in rows}
    delay_p99: Dict[str, List[float]] = {name: [] for name, _ in rows}
    ttfe_p50: Dict[str, List[float]] = {name: [] for name, _ in rows}
    ttfe_p99: Dict[str, List[float]] = {name: [] for name, _ in rows}
    errors: Dict[str, List[str]] = {name: [] for name, _ in rows}
    ttfe_errors = {name: 0 for name, _ in rows}
    for _ in range(args.repeats):
        for name, port in rows:
            many = probe(port, args.streams, args.events, args.gap_ms)
            few = probe(port, args.ttfe_streams, args.ttfe_events, args.ttfe_gap_ms)
            lost[name] += args.streams - many.complete
            delay_p50[name].append(pct(many.delays, 50))
            delay_p99[name].append(pct(many.delays, 99))
            ttfe_p50[name].append(pct(few.ttfe, 50))
            ttfe_p99[name].append(pct(few.ttfe, 99))
            errors[name] += many.errors
            ttfe_errors[name] += len(few.errors)
    for name, _ in rows:
        print(
            f"{name:<24} {args.streams:>8} {lost[name]:>5} {median(delay_p50[name]):>10.2f}"
            f" {median(delay_p99[name]):>10.2f}"
            f" | {median(ttfe_p50[name]):>9.2f} {median(ttfe_p99[name]):>9.2f}"
            f"   runs: delay p99 {'/'.join(f'{v:.1f}' for v in delay_p99[name])},"
            f" ttfe p50 {'/'.join(f'{v:.1f}' for v in ttfe_p50[name])}"
            + (
                f"   unmeasured warm-up runs (p99/ttfe p50): {', '.join(warmup[name])}"
                if warmup[name]
                else ""
            )
            + (f"   first error: {errors[name][0]}" if errors[name] else "")
            + (f"   ttfe-run errors: {ttfe_errors[name]}" if ttfe_errors[name] else ""),
            flush=True,
        )
        harness.result("sse_lost", name, lost[name], "streams")
        harness.result("sse_streams", name, args.streams * args.repeats, "streams")
        harness.result("sse_delay_p50", name, median(delay_p50[name]), "ms")
        harness.result("sse_delay_p99", name, median(delay_p99[name]), "ms")
        harness.result("sse_ttfe_p50", name, median(ttfe_p50[name]), "ms")
        harness.result("sse_ttfe_p99", name, median(ttfe_p99[name]), "ms")
        # Each run's figures, in round order: summary.py compares two rows round by round.
        harness.result("sse_delay_p99_runs", name, delay_p99[name], "ms")
        harness.result("sse_ttfe_p50_runs", name, ttfe_p50[name], "ms")
    if args.pinned_runs:
        first_event_pinned(args, backend, pinned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
