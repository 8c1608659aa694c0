"""
Tests for L{a3s_gateway.workers}: the worker command line, the supervisor (spawning, readiness,
restarts with backoff and a per-minute bound, stopping) over a fake process reactor, and the
worker-side helpers.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.error import (
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
    ReactorNotRunning,
)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.workers import (
    READY_FD,
    READY_LINE,
    RestartPolicy,
    WorkerSupervisor,
    announce_ready,
    watch_supervisor,
    worker_argv,
)


class _FakeProcess:
    """
    The transport of a fake worker: its pid, the signals it was sent, stdin closed or not.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: List[str] = []
        self.stdin_closed = False
        self.exited = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)


class _Spawned:
    def __init__(
        self, protocol: Any, args: Sequence[str], env: Dict[str, str], child_fds: Dict[int, Any]
    ) -> None:
        self.protocol = protocol
        self.args = list(args)
        self.env = env
        self.child_fds = child_fds
        self.transport = _FakeProcess(0)

    def ready(self) -> None:
        self.protocol.childDataReceived(READY_FD, READY_LINE)

    def end(self, code: Optional[int] = 0, sig: Optional[int] = None) -> None:
        self.transport.exited = True
        value = ProcessDone(0) if code == 0 and sig is None else ProcessTerminated(code, sig)
        self.protocol.processEnded(Failure(value))


class _FakeProcessReactor(Clock):
    """
    A clock that records C{spawnProcess} calls and C{stop}.
    """

    def __init__(self) -> None:
        Clock.__init__(self)
        self.spawned: List[_Spawned] = []
        self.stops = 0
        self._next_pid = 1000

    def spawnProcess(
        self,
        protocol: Any,
        executable: str,
        args: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        path: Optional[str] = None,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        usePTY: bool = False,
        childFDs: Optional[Dict[int, Any]] = None,
    ) -> _FakeProcess:
        spawned = _Spawned(protocol, args, env or {}, childFDs or {})
        self._next_pid += 1
        spawned.transport.pid = self._next_pid
        self.spawned.append(spawned)
        protocol.makeConnection(spawned.transport)
        return spawned.transport

    def stop(self) -> None:
        self.stops += 1


ARGV = ["/usr/bin/python3", "-m", "a3s_gateway.cli", "--config", "/etc/g.hcl"]


class SupervisorTests(SynchronousTestCase):
    def supervisor(
        self, count: int = 2, policy: Optional[RestartPolicy] = None
    ) -> Tuple[WorkerSupervisor, _FakeProcessReactor]:
        fake = _FakeProcessReactor()
        supervisor = WorkerSupervisor(
            fake, count, lambda: ARGV, {"A": "1"}, stop_timeout=40, policy=policy or RestartPolicy()
        )
        supervisor.startService()
        return supervisor, fake

    def running(self, count: int = 2) -> Tuple[WorkerSupervisor, _FakeProcessReactor]:
        supervisor, fake = self.supervisor(count)
        for spawned in fake.spawned:
            spawned.ready()
        return supervisor, fake

    def test_spawns_workers(self) -> None:
        """
        Starting spawns C{count} workers with the command and environment, stdin closed, its
        own stdout and stderr, and the readiness pipe on fd 3.
        """
        supervisor, fake = self.supervisor(3)
        self.assertEqual(len(fake.spawned), 3)
        for spawned in fake.spawned:
            self.assertEqual(spawned.args, ARGV)
            self.assertEqual(spawned.env, {"A": "1"})
            self.assertEqual(spawned.child_fds, {0: "w", 1: 1, 2: 2, READY_FD: "r"})
            self.assertTrue(spawned.transport.stdin_closed)
        self.assertEqual(supervisor.pids(), [1001, 1002, 1003])

    def test_start_failure(self) -> None:
        """
        A first-generation worker that exits before it is ready stops the reactor with exit
        code 1 (a bad port or config fails the start rather than looping).
        """
        supervisor, fake = self.supervisor()
        fake.spawned[0].ready()
        fake.spawned[1].end(1)
        self.assertEqual((fake.stops, supervisor.exit_code), (1, 1))
        fake.advance(60)
        self.assertEqual(len(fake.spawned), 2)

    def test_start_failure_of_every_worker(self) -> None:
        """
        Workers that all exit before they are ready (a port every one of them fails to bind)
        stop the reactor once: the reactor refuses a second stop, which would log a traceback.
        """
        supervisor, fake = self.supervisor(3)
        for spawned in fake.spawned:
            spawned.end(1)
        self.assertEqual((fake.stops, supervisor.exit_code), (1, 1))
        self.assertEqual(supervisor.pids(), [])
        fake.advance(60)
        self.assertEqual(len(fake.spawned), 3)

    def test_restart(self) -> None:
        """
        A serving worker that dies is replaced in the same slot after the initial delay.
        """
        supervisor, fake = self.running()
        fake.spawned[0].end(None, 9)
        self.assertEqual(supervisor.pids(), [1002])
        fake.advance(0.4)
        self.assertEqual(len(fake.spawned), 2)
        fake.advance(0.1)
        self.assertEqual(len(fake.spawned), 3)
        self.assertEqual(supervisor.pids(), [1003, 1002])
        self.assertEqual((fake.stops, supervisor.exit_code), (0, 0))

    def test_restart_of_unready_replacement(self) -> None:
        """
        After the start, a replacement that dies before it is ready is restarted too (the
        others keep serving), with a doubled delay.
        """
        _, fake = self.running()
        fake.spawned[0].end(None, 9)
        fake.advance(0.5)
        fake.spawned[2].end(1)
        fake.advance(0.9)
        self.assertEqual(len(fake.spawned), 3)
        fake.advance(0.1)
        self.assertEqual(len(fake.spawned), 4)
        self.assertEqual(fake.stops, 0)

    def test_backoff(self) -> None:
        """
        Early deaths double a slot's delay up to the cap; a worker that served
        C{stable_after} seconds resets it.
        """
        _, fake = self.supervisor(1, RestartPolicy(max_delay=2.0, max_per_minute=100))
        fake.spawned[0].ready()
        delays = []
        for _ in range(4):
            fake.spawned[-1].end(None, 9)
            delays.append(fake.getDelayedCalls()[0].getTime() - fake.seconds())
            fake.advance(delays[-1])
            fake.spawned[-1].ready()
        self.assertEqual(delays, [0.5, 1.0, 2.0, 2.0])
        fake.advance(10)
        fake.spawned[-1].end(None, 9)
        self.assertEqual(fake.getDelayedCalls()[0].getTime() - fake.seconds(), 0.5)

    def test_restarts_per_minute(self) -> None:
        """
        Beyond C{max_per_minute} restarts in 60 s, the next one waits for the oldest to leave
        the window.
        """
        policy = RestartPolicy(initial_delay=1.0, max_delay=1.0, max_per_minute=3)
        _, fake = self.supervisor(1, policy)
        fake.spawned[0].ready()
        for _ in range(3):
            fake.spawned[-1].end(None, 9)
            fake.advance(1.0)
            fake.spawned[-1].ready()
        self.assertEqual(fake.seconds(), 3.0)
        fake.spawned[-1].end(None, 9)
        # The first restart happened at t=1: the fourth waits until t=61.
        self.assertEqual(fake.getDelayedCalls()[0].getTime(), 61.0)

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to every worker and fires once all have exited; nothing is
        restarted meanwhile.
        """
        supervisor, fake = self.running()
        stopped = supervisor.stopService()
        self.assertEqual([s.transport.signals for s in fake.spawned], [["TERM"], ["TERM"]])
        fake.spawned[0].end(0)
        self.assertNoResult(stopped)
        fake.spawned[1].end(0)
        self.successResultOf(stopped)
        self.assertEqual(len(fake.spawned), 2)
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_stop_cancels_pending_restart(self) -> None:
        """
        A restart scheduled before the stop does not happen.
        """
        supervisor, fake = self.running()
        fake.spawned[0].end(None, 9)
        stopped = supervisor.stopService()
        fake.spawned[1].end(0)
        self.successResultOf(stopped)
        fake.advance(60)
        self.assertEqual(len(fake.spawned), 2)

    def test_stop_timeout_kills(self) -> None:
        """
        A worker still running C{stop_timeout} seconds after SIGTERM gets SIGKILL.
        """
        supervisor, fake = self.running()
        stopped = supervisor.stopService()
        fake.spawned[0].end(0)
        fake.advance(40)
        self.assertEqual(fake.spawned[1].transport.signals, ["TERM", "KILL"])
        fake.spawned[1].end(None, 9)
        self.successResultOf(stopped)


class WorkerArgvTests(SynchronousTestCase):
    def test_argv(self) -> None:
        """
        A worker runs the command module with the same file, the C{--listen} override if any,
        and the supervisor's pid.
        """
        self.assertEqual(
            worker_argv("/py", "/g.hcl", None, 42),
            ["/py", "-m", "a3s_gateway.cli", "--config", "/g.hcl", "--worker-of", "42"],
        )
        self.assertEqual(
            worker_argv("/py", "/g.hcl", ":80", 42)[5:], ["--listen", ":80", "--worker-of", "42"]
        )


class _StoppableClock(Clock):
    def __init__(self) -> None:
        Clock.__init__(self)
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


class WorkerSideTests(SynchronousTestCase):
    def test_watch_supervisor(self) -> None:
        """
        A worker stops its reactor (and so drains) once its parent is no longer the supervisor.
        """
        clock = _StoppableClock()
        parent = [42]
        watcher = watch_supervisor(clock, 42, interval=1.0, getppid=lambda: parent[0])
        clock.advance(5)
        self.assertEqual(clock.stops, 0)
        parent[0] = 1
        clock.advance(1)
        self.assertEqual(clock.stops, 1)
        self.assertFalse(watcher.running)

    def test_watch_supervisor_while_stopping(self) -> None:
        """
        A worker already stopping (draining on SIGTERM) when its supervisor goes away just
        goes on stopping.
        """

        class Stopping(Clock):
            def stop(self) -> None:
                raise ReactorNotRunning()

        clock = Stopping()
        watcher = watch_supervisor(clock, 42, interval=1.0, getppid=lambda: 1)
        clock.advance(1)
        self.assertFalse(watcher.running)

    def test_announce_ready(self) -> None:
        """
        Readiness is one line on the pipe, which is then closed.
        """
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        announce_ready(write)
        self.assertEqual(os.read(read, 100), READY_LINE)
        self.assertEqual(os.read(read, 100), b"")
