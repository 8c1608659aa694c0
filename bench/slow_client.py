"""
Slow-client benchmark: bench/backend.py serves a 200 MB body with a Content-Length, and one client
reads it through the proxy at 1 MB/s. The proxy's resident memory (VmRSS) is sampled before the
request and every 0.25 s after; the figure is the growth (peak minus before). A proxy that applies
backpressure to its upstream stays flat; one that buffers grows by what the backend sent ahead.

The full run reads all 200 MB (200 s); by default the client reads at 1 MB/s for --seconds (30)
and then closes, which is enough to show whether the proxy buffers (the backend could send the
whole body to a buffering proxy in well under a second).

usage: slow_client.py [--seconds 30 | --full] [--rate-mb 1] [--size-mb 200] [--python PY]
                      [--rows gateway,stock]
Ports: 127.0.0.1:9320-9322.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

BACKEND, GATEWAY, STOCK = 9321, 9320, 9322
MB = 1024 * 1024


def slow_read(port: int, pid: int, size: int, rate: float, seconds: float) -> tuple[int, int, int]:
    """
    Read GET /big at ``rate`` bytes/s for ``seconds``; return (RSS before KiB, peak KiB, bytes).
    """
    before = harness.rss_kb(pid)
    peak = before
    sock = socket.socket()
    # A small receive buffer, so that the kernel does not absorb megabytes on the client's behalf.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /big?bytes=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % size)
    sock.settimeout(10)
    start = time.monotonic()
    got = 0
    next_sample = start
    while got < size + 100 and time.monotonic() - start < seconds:
        # Take what the schedule allows, in pieces of at most 64 KiB.
        allowed = int((time.monotonic() - start) * rate) - got
        if allowed > 0:
            data = sock.recv(min(allowed, 65536))
            if not data:
                break
            got += len(data)
        else:
            time.sleep(0.01)
        if time.monotonic() >= next_sample:
            peak = max(peak, harness.rss_kb(pid))
            next_sample += 0.25
    peak = max(peak, harness.rss_kb(pid))
    sock.close()
    return before, peak, got


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--full", action="store_true", help="read the whole body (200 s at 1 MB/s)")
    parser.add_argument("--rate-mb", type=float, default=1.0)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--python", default=os.environ.get("PY", sys.executable))
    parser.add_argument("--rows", default="gateway,stock")
    parser.add_argument(
        "--label",
        default=os.environ.get("BENCH_LABEL", ""),
        help="suffix for the RESULT rows, e.g. PyPy",
    )
    args = parser.parse_args()
    size = args.size_mb * MB
    rate = args.rate_mb * MB
    seconds = size / rate + 30 if args.full else args.seconds
    if args.label:
        os.environ["BENCH_LABEL"] = args.label

    procs = harness.Processes(args.python)
    procs.start(
        "backend", BACKEND, [sys.executable, os.path.join(harness.HERE, "backend.py"), str(BACKEND)]
    )
    rows = []
    if "gateway" in args.rows.split(","):
        rows.append(("gateway", GATEWAY, procs.gateway(GATEWAY, BACKEND)))
    if "stock" in args.rows.split(","):
        rows.append(("stock", STOCK, procs.stock(STOCK, BACKEND)))
    print(
        f"slow client: {args.size_mb} MB body, read at {args.rate_mb:g} MB/s for "
        f"{'all of it' if args.full else f'{seconds:g} s'}; "
        f"proxies on {harness.interpreter_label(args.python)}"
    )
    print(f"{'row':<24} {'read MB':>8} {'RSS before MB':>14} {'RSS peak MB':>12} {'growth MB':>10}")
    for name, port, pid in rows:
        # One small request first, so the growth does not count the first request's own setup.
        socket.create_connection(("127.0.0.1", port)).close()
        before, peak, got = slow_read(port, pid, size, rate, seconds)
        growth = (peak - before) / 1024
        print(
            f"{name:<24} {got / MB:>8.1f} {before / 1024:>14.1f} {peak / 1024:>12.1f}"
            f" {growth:>10.1f}",
            flush=True,
        )
        harness.result("slow_growth", name, growth, "MB")
        harness.result("slow_read", name, got / MB, "MB")
        procs.stop(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
