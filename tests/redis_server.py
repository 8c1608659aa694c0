"""
A real ``redis-server`` for the tests of ``rate-limit-redis``: started on a free loopback port in
a temporary directory (no persistence), ready once it answers PING, and stopped when the test
ends.

Without ``redis-server`` the tests that need it are skipped, except when the ``CI`` environment
variable is set: there they fail, so that a CI image missing the package is noticed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Optional, Union

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from a3s_gateway.testing import unused_tcp_port

START_TIMEOUT = 10.0
"""Seconds a server has to answer PING after it is started."""


def redis_server_path() -> Optional[str]:
    """
    Where ``redis-server`` is (on C{PATH} or in ``/usr/bin`` / ``/usr/sbin``), or None.
    """
    found = shutil.which("redis-server")
    if found is not None:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """
    One ``redis-server`` process on 127.0.0.1.

    @ivar port: its TCP port (kept across L{stop} and L{start}, so that a restart is seen by
        clients as the same server coming back).
    @ivar url: ``redis://127.0.0.1:<port>``.
    """

    def __init__(self, executable: str, directory: str, port: int) -> None:
        self._executable = executable
        self._directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}"
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._paused = False

    def start(self) -> defer.Deferred[None]:
        """
        Start the server; fires once it answers PING.
        """
        log = open(os.path.join(self._directory, "redis.log"), "ab")
        with log:
            self._process = subprocess.Popen(
                [
                    self._executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self._directory,
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._directory,
            )
        return self._wait_until_ready(reactor.seconds() + START_TIMEOUT)

    def _wait_until_ready(self, deadline: float) -> defer.Deferred[None]:
        process = self._process
        assert process is not None
        if _answers_ping(self.port):
            return defer.succeed(None)
        if process.poll() is not None or reactor.seconds() > deadline:
            self.stop()
            with open(os.path.join(self._directory, "redis.log"), "rb") as f:
                output = f.read()[-2000:].decode("utf-8", "replace")
            return defer.fail(RuntimeError(f"redis-server did not start:\n{output}"))
        return deferLater(reactor, 0.02, self._wait_until_ready, deadline)  # type: ignore[arg-type]

    def pause(self) -> None:
        """
        Freeze the server (SIGSTOP): connections are still accepted by the kernel but nothing
        is answered — a hung Redis.
        """
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo L{pause}."""
        if self._process is not None and self._paused:
            self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """
        Stop the server (no-op when it is not running).
        """
        process, self._process = self._process, None
        if process is None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_redis(test: TestCase) -> defer.Deferred[RedisServer]:
    """
    Start a Redis server for C{test} and stop it (and remove its directory) when the test
    ends. Skips the test when ``redis-server`` is missing, or fails it when ``CI`` is set.
    """
    executable = redis_server_path()
    if executable is None:
        message = "redis-server is not installed (Debian package redis-server)"
        if os.environ.get("CI"):
            test.fail(message + " and CI is set: the Redis tests must run")
        raise SkipTest(message)
    directory = tempfile.mkdtemp(prefix="a3s-redis-")
    test.addCleanup(shutil.rmtree, directory, True)

    def attempt(tries_left: int) -> defer.Deferred[RedisServer]:
        server = RedisServer(executable, directory, unused_tcp_port())
        test.addCleanup(server.stop)

        def retry(failure: Failure) -> Union[Failure, defer.Deferred[RedisServer]]:
            # Another process may have taken the free port between its choice and the bind.
            return attempt(tries_left - 1) if tries_left > 1 else failure

        return server.start().addCallbacks(lambda _: server, retry)

    return attempt(3)
