# -*- test-case-name: tests.test_tap -*-
"""
twistd integration: the plugin's L{Options} and L{makeService}.

With no C{--config}, the packaged default configuration (C{conf/gateway.hcl}) is served together
with the demo upstreams it points at, so a newcomer sees the gateway work with nothing else
running.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from typing import Any, List, Mapping, Optional

import attr
from twisted.application.service import IService, MultiService
from twisted.python import usage

from a3s_gateway import __version__
from a3s_gateway.config import ConfigError, GatewayConfig, apply_listen, load_config
from a3s_gateway.config.validate import validate_config

IS_PYPY = platform.python_implementation() == "PyPy"

DEFAULT_CONFIG_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "conf", "gateway.hcl"
)


class Options(usage.Options):
    """
    Options of C{twistd a3s-gateway}, shared by the C{a3s-gateway} command. Parsing them loads and
    validates the configuration, so a bad one is reported as a usage error and nothing starts.
    """

    synopsis = "[--config PATH] [--listen ADDR] [--workers N]"
    optParameters = [
        ["config", "c", None, "Path to the HCL config file (default: the embedded demo config)."],
        ["listen", "l", None, "Replace (or create) the HTTP entrypoint 'web' with this address."],
        ["workers", "w", None, "Serve with N processes (overrides the config's workers).", int],
    ]

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"a3s-gateway {__version__}")
        raise SystemExit(0)

    opt_V = opt_version

    def postOptions(self) -> None:
        try:
            self["gateway_config"] = load(self["config"], self["listen"], self["workers"])
        except ConfigError as e:
            if self.parent is not None:
                # Under twistd (our parent is its ServerOptions): twistd up to 26.4 prints a
                # plugin's usage error and exits 0; a bad configuration must fail the process.
                sys.stderr.write(f"Error: {e}\n")
                raise SystemExit(1) from e
            raise usage.UsageError(str(e)) from e


def load(
    path: Optional[str], listen: Optional[str], workers: Optional[int] = None
) -> GatewayConfig:
    """
    The configuration at C{path} (the embedded default when None), with C{--listen} and
    C{--workers} applied.

    @raise a3s_gateway.config.ConfigError: when it is missing or invalid.
    """
    config = load_config(path if path is not None else DEFAULT_CONFIG_PATH)
    if listen:
        config = apply_listen(config, listen)
    if workers is not None:
        config = attr.evolve(config, workers=workers)
        validate_config(config)
    return config


class GatewayApplication(MultiService):
    """
    The root of the process's service tree. A port that cannot be bound is reported as one line
    on stderr and exits the process with status 1, without a traceback, before anything runs.
    On PyPy the JIT is tuned for a server first (L{tune_jit}); once everything has started,
    what start-up left on the heap is frozen (L{freeze_heap}).
    """

    def startService(self) -> None:
        tune_jit()
        MultiService.startService(self)
        freeze_heap()

    def privilegedStartService(self) -> None:
        from twisted.internet.error import CannotListenError

        from a3s_gateway.gateway import GatewayStartError

        try:
            MultiService.privilegedStartService(self)
        except (GatewayStartError, CannotListenError) as e:
            sys.stderr.write(f"Error: {e}\n")
            raise SystemExit(1) from e


JIT_PARAMS = "decay=0"
"""
The PyPy JIT parameters the started gateway sets (L{tune_jit}).
"""


def tune_jit() -> None:
    """
    On PyPy, set L{JIT_PARAMS}: the JIT's counters of how often a loop or a function ran stop
    decaying, so whatever the gateway runs often enough gets compiled, however spread out over
    time. Does nothing elsewhere.

    Why: by default PyPy regularly decays those counters, which keeps code that runs in bursts
    from being compiled. A gateway's paths (a connection's setup, a stream's event, a
    response's head) run thousands of times a second, interleaved, and under the default the
    JIT went on tracing them at every 1,000-stream burst, pausing the gateway up to ~30 ms
    per trace. Without the decay, measured side by side: throughput +11 to 14% (wrk, 50
    connections), the per-event delay p99 at 1,000 SSE streams halved (median of ten runs
    12 to 14 ms against 22.5).
    """
    try:
        import pypyjit
    except ImportError:
        return
    pypyjit.set_param(JIT_PARAMS)


NURSERY_ENV = "PYPY_GC_NURSERY"
"""The environment variable PyPy reads its garbage collector's nursery size from, at start."""

NURSERY_MIN, NURSERY_MAX = 4 * 2**20, 32 * 2**20
"""The bounds of the nursery size L{gc_nursery} chooses, in bytes."""

CPU_CACHES = "/sys/devices/system/cpu/cpu0/cache"


def _cache_size(text: str) -> int:
    """A sysfs cache size (``32768K``, ``2M``, ``512``) in bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip()
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def last_level_cache(caches: str = CPU_CACHES) -> Optional[int]:
    """
    The size in bytes of the highest-level data (or unified) cache of the first CPU, as Linux
    describes it under C{caches}; None when that is unknown.
    """
    try:
        names = os.listdir(caches)
    except OSError:
        return None
    found: Optional[tuple[int, int]] = None
    for name in names:
        if not name.startswith("index"):
            continue
        try:
            with open(os.path.join(caches, name, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(caches, name, "level")) as f:
                level = int(f.read())
            with open(os.path.join(caches, name, "size")) as f:
                size = _cache_size(f.read())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and (found is None or level > found[0]):
            found = (level, size)
    return None if found is None else found[1]


def gc_nursery(
    environ: Mapping[str, str], pypy: bool = IS_PYPY, caches: str = CPU_CACHES
) -> Optional[str]:
    """
    The C{PYPY_GC_NURSERY} value the C{a3s-gateway} command starts PyPy with: half the
    last-level cache, within L{NURSERY_MIN} and L{NURSERY_MAX}. None where it sets none: not
    PyPy, the variable already set (the operator's choice stands), or the cache size unknown.

    Why: every new object is made in the nursery, and the nursery is collected each time it is
    full. PyPy sizes it from the cache size in C{/proc/cpuinfo}, which on x86 is the second-level
    cache (1 MiB on the development VM, whose third-level cache is 32 MiB): a 1 MiB nursery,
    collected many times a second under load. Measured there (PyPy 7.3.11, wrk with 50
    connections, the gateway on its own core, medians of eight rounds): 25.1k req/s with PyPy's
    choice, 29.1k with 4 MiB, 31.0k with 8 MiB, 34.0k with 16 MiB, 33.1k with 32 MiB.

    What it costs: memory, more than the nursery itself. Holding 10,000 idle connections, the
    gateway grew by 52 MB with a 16 MiB nursery against 17 MB with PyPy's choice (5.3 KiB a
    connection against 1.7). C{PYPY_GC_NURSERY} set by the operator is left alone.
    """
    if not pypy or NURSERY_ENV in environ:
        return None
    size = last_level_cache(caches)
    if size is None:
        return None
    return f"{min(NURSERY_MAX, max(NURSERY_MIN, size // 2)) // 1024}KB"


def freeze_heap() -> None:
    """
    Collect start-up's garbage, then move every object still alive (modules, the configuration,
    the service tree: about 100,000 of them) out of the reach of CPython's cyclic garbage
    collector for the rest of the process's life (C{gc.freeze}). Does nothing where the
    interpreter has no C{gc.freeze} (PyPy).

    Why: a full collection walks every object it tracks. A burst of new connections (a
    thousand streams opening at once) grows the heap enough to set one off; with start-up's
    objects included it paused the gateway for up to 53 ms, every stream's events waiting
    behind it, and without them up to 22 ms. Those objects live as long as the process, so
    walking them finds nothing to free.
    """
    freeze = getattr(gc, "freeze", None)
    if freeze is None:
        return
    gc.collect()
    freeze()


def build_service(
    config: GatewayConfig,
    reactor: Any,
    with_demo: bool,
    listen: Optional[str] = None,
    worker: bool = False,
) -> IService:
    """
    The gateway service tree: the L{Gateway}, preceded by the demo upstreams when the embedded
    default configuration is served. With C{config.workers > 1} a L{WorkerSupervisor} takes the
    gateway's place: it runs that many worker processes of the same file (and C{listen}). A
    C{worker} binds its ports with C{SO_REUSEPORT}.
    """
    from a3s_gateway.gateway import Gateway

    root = GatewayApplication()
    if with_demo:
        from a3s_gateway.demo import DemoUpstreams

        DemoUpstreams(reactor).setServiceParent(root)
    if config.workers > 1 and not worker:
        from a3s_gateway.workers import WorkerSupervisor, worker_argv

        path = os.path.abspath(config.source)

        def argv() -> List[str]:
            return worker_argv(sys.executable, path, listen, os.getpid())

        WorkerSupervisor(
            reactor,
            config.workers,
            argv,
            dict(os.environ),
            # Each worker drains for up to shutdown_timeout_secs; allow for its start-up too.
            stop_timeout=config.shutdown_timeout_secs + 10,
        ).setServiceParent(root)
    else:
        Gateway(config, reactor, reuse_port=worker).setServiceParent(root)
    return root


def makeService(options: Options) -> IService:
    """
    twistd's entry point.
    """
    from twisted.internet import reactor

    return build_service(
        options["gateway_config"],
        reactor,
        with_demo=options["config"] is None,
        listen=options["listen"],
    )
