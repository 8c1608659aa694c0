# -*- test-case-name: tests.test_cli -*-
"""
The ``a3s-gateway`` command: run the gateway without twistd's daemon options, validate a
configuration, print the version.

    a3s-gateway [--config PATH] [--listen ADDR] [--workers N]
    a3s-gateway validate [--config PATH]
    a3s-gateway --config PATH validate
    a3s-gateway --version
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, TextIO

from twisted.python import usage
from twisted.python.reflect import fullyQualifiedName

from a3s_gateway import __version__
from a3s_gateway.config import (
    ConfigError,
    ConfigNotFound,
    ConfigParseError,
    load_config,
    validation_summary,
)


class ValidateOptions(usage.Options):
    synopsis = "[--config PATH]"
    optParameters = [["config", "c", None, "Path to the HCL config file (default: gateway.hcl)."]]


class CommandOptions(usage.Options):
    """
    The command line of C{a3s-gateway}.
    """

    synopsis = "[--config PATH] [--listen ADDR] [--workers N] [validate [--config PATH]]"
    optParameters = [
        ["config", "c", None, "Path to the HCL config file (default: the embedded demo config)."],
        ["listen", "l", None, "Replace (or create) the HTTP entrypoint 'web' with this address."],
        ["workers", "w", None, "Serve with N processes (overrides the config's workers).", int],
        [
            "worker-of",
            None,
            None,
            "Internal: serve as a worker of the supervisor with this process id.",
            int,
        ],
    ]
    subCommands = [["validate", None, ValidateOptions, "Validate a configuration file and exit."]]

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"a3s-gateway {__version__}")
        raise SystemExit(0)

    opt_V = opt_version


def validate(path: str, out: TextIO, err: TextIO) -> int:
    """
    Validate the file at C{path} as C{a3s-gateway validate} does, printing the reference's
    messages; return the exit code.
    """
    try:
        config = load_config(path)
    except ConfigNotFound:
        err.write(f"✗ Config file not found: {path}\n")
        return 1
    except ConfigParseError as e:
        err.write(f"✗ Parse error: {e}\n")
        return 1
    except ConfigError as e:
        err.write(f"✗ Validation error: {e}\n")
        return 1
    out.write(validation_summary(config, path) + "\n")
    return 0


def _install_reactor() -> None:
    """
    Install the gateway's reactor (L{a3s_gateway.reactor}) unless a reactor is installed
    already; where epoll does not exist, Twisted's default is used.
    """
    if "twisted.internet.reactor" in sys.modules:
        return
    try:
        from a3s_gateway.reactor import install
    except ImportError:
        return
    install()


def run(
    config_path: Optional[str],
    listen: Optional[str],
    err: TextIO,
    workers: Optional[int] = None,
    worker_of: Optional[int] = None,
) -> int:
    """
    Run the gateway in the foreground until SIGTERM or SIGINT, which drain it: one process, or
    a supervisor of C{workers} processes, or (C{worker_of}) one of those workers.
    """
    _install_reactor()
    from twisted.internet import reactor
    from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

    from a3s_gateway.tap import build_service, load
    from a3s_gateway.workers import (
        WorkerSupervisor,
        announce_ready,
        ignore_interrupts,
        watch_supervisor,
    )

    try:
        config = load(config_path, listen, workers)
    except ConfigError as e:
        err.write(f"Error: {e}\n")
        return 1
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    Logger(namespace="a3s_gateway.cli").info(
        "reactor class: {name}", name=fullyQualifiedName(type(reactor))
    )
    worker = worker_of is not None
    service = build_service(
        config, reactor, with_demo=config_path is None, listen=listen, worker=worker
    )
    try:
        service.privilegedStartService()
    except SystemExit as e:
        return int(e.code or 1)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if worker_of is not None:
        ignore_interrupts()
        watch_supervisor(reactor, worker_of)
        announce_ready()
    reactor.run()
    supervisors = [s for s in service if isinstance(s, WorkerSupervisor)]  # type: ignore[attr-defined]
    return max([s.exit_code for s in supervisors], default=0)


def _restart_with_nursery() -> None:
    """
    On PyPy, run this command again in place (the same process, arguments and environment) with
    the garbage collector's nursery size that L{a3s_gateway.tap.gc_nursery} chooses, which PyPy
    reads only as it starts. Elsewhere, or when the environment names a size, nothing happens.
    """
    from a3s_gateway.tap import NURSERY_ENV, gc_nursery

    nursery = gc_nursery(os.environ)
    if nursery is None:
        return
    # Set before the attempt: should it fail, the workers this process starts still get it.
    os.environ[NURSERY_ENV] = nursery
    # Started the same way again, so that the same code is found on the same path: the console
    # script as a script, "python -m" as a module.
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    start = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    try:
        os.execv(sys.executable, [sys.executable, *start, *sys.argv[1:]])
    except OSError as e:
        sys.stderr.write(f"Could not restart with {NURSERY_ENV}={nursery}: {e}\n")


def main(argv: Optional[List[str]] = None) -> int:
    """
    The console script's entry point.
    """
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\nError: {e}\n")
        return 2
    if options.subCommand == "validate":
        path = options.subOptions["config"] or options["config"] or "gateway.hcl"
        return validate(path, sys.stdout, sys.stderr)
    if argv is None:
        _restart_with_nursery()
    return run(
        options["config"], options["listen"], sys.stderr, options["workers"], options["worker-of"]
    )


if __name__ == "__main__":
    raise SystemExit(main())
