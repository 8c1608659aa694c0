# -*- test-case-name: tests.test_cli -*-
"""
The ``a3s-gateway`` command: run the gateway without twistd's daemon options, validate a
configuration, print the version.

    a3s-gateway [--config PATH] [--listen ADDR]
    a3s-gateway validate [--config PATH]
    a3s-gateway --config PATH validate
    a3s-gateway --version
"""

from __future__ import annotations

import sys
from typing import List, Optional, TextIO

from twisted.python import usage

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

    synopsis = "[--config PATH] [--listen ADDR] [validate [--config PATH]]"
    optParameters = [
        ["config", "c", None, "Path to the HCL config file (default: the embedded demo config)."],
        ["listen", "l", None, "Replace (or create) the HTTP entrypoint 'web' with this address."],
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


def run(config_path: Optional[str], listen: Optional[str], err: TextIO) -> int:
    """
    Run the gateway in the foreground until SIGTERM or SIGINT, which drain it.
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from a3s_gateway.tap import build_service, load

    try:
        config = load(config_path, listen)
    except ConfigError as e:
        err.write(f"Error: {e}\n")
        return 1
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = build_service(config, reactor, with_demo=config_path is None)
    try:
        service.privilegedStartService()
    except SystemExit as e:
        return int(e.code or 1)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


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
    return run(options["config"], options["listen"], sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
