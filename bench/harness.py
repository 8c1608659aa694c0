"""
What bench/sse.py, bench/slow_client.py and bench/idle.py share: starting the rows' processes
(the gateway from the checkout, Twisted's stock proxy, the hello-world, nginx and HAProxy when
installed) on 127.0.0.1, waiting for their ports, reading their memory, stopping them all on exit,
and writing the ``RESULT`` lines that bench/summary.py turns into the suite's table.

Not a library module of the gateway: it is only imported by the benchmark scripts beside it.
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit towards ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def accepts(port: int) -> bool:
    """True when something accepts a TCP connection on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def have(tool: str) -> bool:
    """True when ``tool`` is on PATH (nginx and haproxy live in /usr/sbin on Debian)."""
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is not None


def tool_path(tool: str) -> str:
    """The path of ``tool`` (see :func:`have`)."""
    found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{tool} is not installed")
    return found


class Processes:
    """
    The processes one benchmark script starts, in a private temporary directory; all are stopped
    (SIGTERM, then SIGKILL after 5 s) when the script exits, on Ctrl-C or SIGTERM too.
    """

    def __init__(self, python: str) -> None:
        self.python = python
        self.dir = tempfile.mkdtemp(prefix="a3s-bench-")
        self.procs: List[subprocess.Popen[bytes]] = []
        atexit.register(self.stop_all)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def start(
        self, name: str, port: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None
    ) -> int:
        """Run ``argv`` in the background and wait until ``port`` accepts; return its pid."""
        if accepts(port):
            raise RuntimeError(f"127.0.0.1:{port} is already in use; stop whatever listens there")
        log = open(os.path.join(self.dir, name + ".log"), "wb")
        full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env
        )
        self.procs.append(proc)
        for _ in range(300):
            if accepts(port):
                return proc.pid
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        with open(os.path.join(self.dir, name + ".log"), "rb") as out:
            tail = out.read()[-800:].decode(errors="replace")
        raise RuntimeError(f"{name} did not start listening on 127.0.0.1:{port}:\n{tail}")

    def optional(self, what: str, start: Callable[[], int]) -> Optional[int]:
        """Start an optional row; on failure print why and return None."""
        try:
            return start()
        except RuntimeError as e:
            print(f"warning: no {what} row: {e}", file=sys.stderr)
            return None

    def stop(self, pid: int) -> None:
        """Stop one process started here."""
        for proc in self.procs:
            if proc.pid == pid:
                _terminate([proc])
                self.procs.remove(proc)
                return

    def stop_all(self) -> None:
        """Stop everything started here and remove the temporary directory."""
        _terminate(self.procs)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, name: str, text: str) -> str:
        """Write ``text`` to ``name`` in the temporary directory; return its path."""
        path = os.path.join(self.dir, name)
        with open(path, "w") as out:
            out.write(text)
        return path

    # --- the rows ---------------------------------------------------------------------------

    def gateway(self, port: int, backend_port: int) -> int:
        """The gateway from the checkout: one router, one service with one server."""
        config = self.write(
            f"gateway-{port}.hcl",
            f'entrypoints "web" {{\n  address = "127.0.0.1:{port}"\n}}\n'
            f'routers "all" {{\n  rule    = "PathPrefix(`/`)"\n  service = "backend"\n}}\n'
            f'services "backend" {{\n  load_balancer {{\n    servers = [\n'
            f'      {{ url = "http://127.0.0.1:{backend_port}" }}\n    ]\n  }}\n}}\n',
        )
        return self.start(
            "gateway", port, [self.python, "-m", "a3s_gateway.cli", "--config", config]
        )

    def stock(self, port: int, backend_port: int) -> int:
        """Twisted's stock ReverseProxyResource (bench/stock_proxy.py)."""
        script = os.path.join(HERE, "stock_proxy.py")
        return self.start("stock", port, [self.python, script, str(port), str(backend_port)])

    def hello(self, port: int) -> int:
        """The twisted.web hello-world (bench/hello.py)."""
        return self.start("hello", port, [self.python, os.path.join(HERE, "hello.py"), str(port)])

    def nginx(self, name: str, port: int, location: str, http_extra: str = "") -> int:
        """nginx, one process (master_process off, so the pid started is the one serving)."""
        d = self.dir
        conf = self.write(
            name + ".conf",
            f"worker_processes 1;\nmaster_process off;\npid {d}/{name}.pid;\n"
            f"error_log {d}/{name}.err warn;\nworker_rlimit_nofile {_max_fds()};\n"
            f"events {{ worker_connections {_max_fds() - 100}; }}\n"
            "http {\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n"
            f"  client_body_temp_path {d}/{name}-body;\n  proxy_temp_path {d}/{name}-proxy;\n"
            f"  fastcgi_temp_path {d}/{name}-fcgi;\n  uwsgi_temp_path {d}/{name}-uwsgi;\n"
            f"  scgi_temp_path {d}/{name}-scgi;\n  {http_extra}\n"
            f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n"
            f"    location / {{ {location} }}\n  }}\n}}\n",
        )
        return self.start(name, port, [tool_path("nginx"), "-c", conf, "-g", "daemon off;"])

    def nginx_proxy(self, port: int, backend_port: int, buffering: bool = True) -> int:
        """nginx as a reverse proxy with upstream keep-alive (``proxy_buffering off`` if asked)."""
        off = "" if buffering else " proxy_buffering off;"
        return self.nginx(
            f"nginx-{port}",
            port,
            'proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";' + off,
            f"upstream be {{ server 127.0.0.1:{backend_port}; keepalive 64; }}",
        )

    def haproxy(self, port: int, backend_port: int) -> int:
        """HAProxy, one thread, http-reuse always."""
        cfg = self.write(
            f"haproxy-{port}.cfg",
            f"global\n  nbthread 1\n  maxconn {_max_fds() // 2 - 100}\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 300s\n"
            "  timeout server 300s\n  option http-keep-alive\n"
            f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
            f"backend be\n  http-reuse always\n  server s1 127.0.0.1:{backend_port}\n",
        )
        return self.start(f"haproxy-{port}", port, [tool_path("haproxy"), "-f", cfg, "-db"])


def _max_fds() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _terminate(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + 5
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def result(measure: str, row: str, value: Union[float, Sequence[float]], unit: str) -> None:
    """
    One figure for bench/summary.py: ``RESULT measure|row|value|unit`` on stdout, and appended to
    the file named by $BENCH_RESULTS when set; ``row`` gets `` ($BENCH_LABEL)`` appended when set.
    A sequence of values (each run's, in round order, for a ``<measure>_runs`` line) is written
    space-separated.
    """
    label = os.environ.get("BENCH_LABEL")
    if label:
        row = f"{row} ({label})"
    text = " ".join(f"{v:.4f}" for v in value) if isinstance(value, Sequence) else f"{value:.4f}"
    line = f"RESULT {measure}|{row}|{text}|{unit}"
    print(line, flush=True)
    path = os.environ.get("BENCH_RESULTS")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def interpreter_label(python: str) -> str:
    """``CPython 3.11.7`` or ``PyPy 3.9.18`` for ``python``."""
    out = subprocess.run(
        [
            python,
            "-c",
            "import platform; print(platform.python_implementation(), platform.python_version())",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or python
