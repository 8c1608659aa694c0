# -*- test-case-name: tests.test_workers -*-
"""
Multi-core serving (``workers = N`` or ``--workers N``): for the gateway's command and twistd
plugin, and for embedders that want the same process model.

With N > 1 the process that was started becomes a L{WorkerSupervisor}: it runs N copies of
``python -m a3s_gateway.cli --config F --worker-of <supervisor pid>``, each a complete gateway
binding every HTTP/TCP entrypoint with C{SO_REUSEPORT}
(L{a3s_gateway.transport.TCPServerEndpoint}), so the kernel spreads new connections over them.
The supervisor restarts a worker that dies (with a backoff and a bound on restarts per minute)
and, when it is stopped, sends SIGTERM to every worker and waits while each drains its own
connections.

Everything a gateway keeps in memory (health-check results, passive health, circuit breakers,
in-memory rate limits, sticky-session state, metrics and the admin API's statistics) is per
worker; the C{rate-limit-redis} middleware is the one limit shared by all of them.
"""

from __future__ import annotations

import collections
import os
import signal
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

import attr
from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import (
    IDelayedCall,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

# The pipe a worker reports readiness on: the supervisor reads it, the worker writes one line
# once every entrypoint is bound and its services have started.
READY_FD = 3
READY_LINE = b"ready\n"
MAX_WORKERS = 64


def worker_argv(
    executable: str, config_path: str, listen: Optional[str], supervisor_pid: int
) -> List[str]:
    """
    The command line of one worker: the C{a3s-gateway} command in worker mode for the same
    configuration file and C{--listen} override.
    """
    argv = [executable, "-m", "a3s_gateway.cli", "--config", config_path]
    if listen:
        argv += ["--listen", listen]
    return [*argv, "--worker-of", str(supervisor_pid)]


@attr.s(frozen=True, auto_attribs=True)
class RestartPolicy:
    """
    How dead workers come back.

    @ivar initial_delay: seconds before restarting a worker that died.
    @ivar max_delay: the cap of the delay, which doubles for each consecutive early death.
    @ivar stable_after: a worker that lived this long before dying resets its slot's backoff.
    @ivar max_per_minute: restarts (over every slot) allowed in any 60 s; more wait their turn.
    """

    initial_delay: float = 0.5
    max_delay: float = 10.0
    stable_after: float = 10.0
    max_per_minute: int = 10


DEFAULT_POLICY = RestartPolicy()


class _Worker(protocol.ProcessProtocol):
    """
    One running worker process, as the supervisor sees it.
    """

    def __init__(self, supervisor: WorkerSupervisor, slot: int, started: float) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = started
        self.pid: Optional[int] = None
        self.ready = False
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        # Workers never read their standard input: give them EOF rather than a terminal.
        self.transport.closeStdin()  # type: ignore[union-attr]
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == READY_FD and not self.ready and READY_LINE in data:
            self.ready = True
            self.supervisor._worker_ready(self)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._worker_ended(self, reason)
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass


def _describe(reason: Failure) -> str:
    number = getattr(reason.value, "signal", None)
    if number is not None:
        return f"killed by signal {number}"
    return f"exited with status {getattr(reason.value, 'exitCode', None)}"


class WorkerSupervisor(Service):
    """
    Runs C{count} worker processes with C{env}, keeps them running, and stops them together.
    C{argv} gives the workers' command line (the same for each) when the service starts.

    A worker of the first generation that exits before reporting ready is a start failure:
    the others are stopped, L{exit_code} becomes 1 and the reactor is stopped. Later deaths are
    restarted under L{RestartPolicy}. L{stopService} sends SIGTERM to every worker and waits for
    all of them; one still running C{stop_timeout} seconds later is killed.

    @param reactor: an C{IReactorProcess}, C{IReactorTime} and C{IReactorCore}.
    @ivar workers: the live workers by slot.
    @ivar exit_code: 1 after a start failure, else 0.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: Callable[[], Sequence[str]],
        env: Mapping[str, str],
        stop_timeout: float,
        policy: RestartPolicy = DEFAULT_POLICY,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self.argv = argv
        self._command: List[str] = []
        self.env = dict(env)
        self.stop_timeout = stop_timeout
        self.policy = policy
        self.workers: Dict[int, _Worker] = {}
        self.exit_code = 0
        self._starting = True
        self._stopping = False
        self._backoff: Dict[int, float] = {}
        self._pending: Dict[int, IDelayedCall] = {}
        self._restarts: Deque[float] = collections.deque()

    def pids(self) -> List[int]:
        """
        The process ids of the live workers, by slot.
        """
        return [w.pid for _, w in sorted(self.workers.items()) if w.pid is not None]

    def startService(self) -> None:
        Service.startService(self)
        self._log.info(
            "Supervisor (pid {pid}) starting {count} workers", pid=os.getpid(), count=self.count
        )
        # The command names this process, so it is built once running (after twistd forked).
        self._command = list(self.argv())
        for slot in range(self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._pending.pop(slot, None)
        worker = _Worker(self, slot, self._reactor.seconds())
        self.workers[slot] = worker
        self._reactor.spawnProcess(
            worker,
            self._command[0],
            self._command,
            env=self.env,
            childFDs={0: "w", 1: 1, 2: 2, READY_FD: "r"},
        )
        self._log.info("Worker {slot} started (pid {pid})", slot=slot, pid=worker.pid)

    def _worker_ready(self, worker: _Worker) -> None:
        self._log.info("Worker {slot} (pid {pid}) ready", slot=worker.slot, pid=worker.pid)
        if self._starting and all(w.ready for w in self.workers.values()):
            self._starting = False
            self._log.info("All {count} workers serving", count=self.count)

    def _worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        how = _describe(reason)
        if self._stopping:
            self._log.info(
                "Worker {slot} (pid {pid}) {how}", slot=worker.slot, pid=worker.pid, how=how
            )
            return
        if self._starting and not worker.ready:
            self._log.critical(
                "Worker {slot} (pid {pid}) {how} before it was ready; stopping",
                slot=worker.slot,
                pid=worker.pid,
                how=how,
            )
            self.exit_code = 1
            # Stopping from here on: the other workers, failing the same way in this same turn
            # (a port none of them can bind), must not stop the reactor a second time.
            self._stopping = True
            self._reactor.stop()
            return
        now = self._reactor.seconds()
        delay = self._next_delay(worker, now)
        self._log.warn(
            "Worker {slot} (pid {pid}) {how}; restarting in {delay:.1f}s",
            slot=worker.slot,
            pid=worker.pid,
            how=how,
            delay=delay,
        )
        self._restarts.append(now + delay)
        self._pending[worker.slot] = self._reactor.callLater(delay, self._spawn, worker.slot)

    def _next_delay(self, worker: _Worker, now: float) -> float:
        policy = self.policy
        if now - worker.started >= policy.stable_after:
            delay = policy.initial_delay
        else:
            previous = self._backoff.get(worker.slot)
            delay = policy.initial_delay if previous is None else previous * 2
        delay = min(delay, policy.max_delay)
        self._backoff[worker.slot] = delay
        # Keep at most max_per_minute restarts in any 60 s: a later one waits for the oldest
        # in the window to leave it.
        while self._restarts and self._restarts[0] <= now - 60:
            self._restarts.popleft()
        if len(self._restarts) >= policy.max_per_minute:
            delay = max(delay, self._restarts[-policy.max_per_minute] + 60 - now)
        return delay

    def stopService(self) -> defer.Deferred[None]:
        """
        SIGTERM to every worker; fires once all have exited (each drains its connections up to
        C{shutdown_timeout_secs}); any still running after C{stop_timeout} gets SIGKILL.
        """
        Service.stopService(self)
        self._stopping = True
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        live = list(self.workers.values())
        self._log.info("Stopping {count} workers", count=len(live))
        for worker in live:
            worker.signal("TERM")

        def kill() -> None:
            for worker in self.workers.values():
                self._log.warn(
                    "Worker {slot} (pid {pid}) still running; killing it",
                    slot=worker.slot,
                    pid=worker.pid,
                )
                worker.signal("KILL")

        deadline = self._reactor.callLater(self.stop_timeout, kill)
        done: defer.Deferred[Any] = defer.gatherResults([w.ended for w in live])

        def finished(_: object) -> None:
            if deadline.active():
                deadline.cancel()

        return done.addCallback(finished)


def announce_ready(fd: int = READY_FD) -> None:
    """
    In a worker: tell the supervisor this worker serves (and close the pipe).
    """
    try:
        os.write(fd, READY_LINE)
    finally:
        os.close(fd)


def ignore_interrupts() -> None:
    """
    In a worker, before the reactor runs: ignore SIGINT (the reactor then leaves it alone). A
    Ctrl-C reaches the whole process group, and the supervisor forwards it as SIGTERM.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def watch_supervisor(
    reactor: Any,
    supervisor_pid: int,
    interval: float = 1.0,
    getppid: Callable[[], int] = os.getppid,
) -> LoopingCall:
    """
    In a worker: stop the reactor (which drains the gateway) once the supervisor is no longer
    this process's parent, so a supervisor killed with SIGKILL does not leave workers behind.
    """
    log = Logger()

    def check() -> None:
        if getppid() != supervisor_pid:
            log.warn("Supervisor {pid} is gone; stopping", pid=supervisor_pid)
            watcher.stop()
            try:
                reactor.stop()
            except error.ReactorNotRunning:
                # Already stopping (draining on a signal): nothing more to do.
                pass

    watcher = LoopingCall(check)
    watcher.clock = reactor
    watcher.start(interval, now=False)
    return watcher
