"""
Tests for L{a3s_gateway.tap}: the twistd plugin, its options and the service tree it builds.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys

from twisted.application.service import IServiceCollection, IServiceMaker, Service
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from a3s_gateway.demo import DemoUpstreams
from a3s_gateway.gateway import Gateway
from a3s_gateway.tap import (
    DEFAULT_CONFIG_PATH,
    JIT_PARAMS,
    NURSERY_ENV,
    GatewayApplication,
    Options,
    gc_nursery,
    last_level_cache,
    makeService,
    tune_jit,
)
from a3s_gateway.workers import WorkerSupervisor

CONFIG = """
entrypoints "web" {
  address = "127.0.0.1:0"
}
routers "all" {
  rule    = "PathPrefix(`/`)"
  service = "svc"
}
services "svc" {
  load_balancer {
    servers = [{ url = "http://127.0.0.1:9" }]
  }
}
"""


class PluginTests(SynchronousTestCase):
    def test_plugin_discovered(self) -> None:
        """
        Twisted's plugin system finds the C{a3s-gateway} service maker pointing at this module.
        """
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("a3s-gateway", makers)
        self.assertEqual(makers["a3s-gateway"].module, "a3s_gateway.tap")  # type: ignore[attr-defined]

    def test_twistd_help_lists_plugin(self) -> None:
        """
        After installation, C{twistd --help} lists C{a3s-gateway} (run from another directory,
        so only the installed package can provide it).
        """
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        output = subprocess.run(
            [twistd, "--help"],
            cwd=os.path.dirname(os.path.abspath(self.mktemp())),
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        self.assertIn(b"a3s-gateway", output)


class OptionsTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_default_config(self) -> None:
        """
        Without C{--config} the packaged default configuration is loaded: entrypoint C{web} on
        127.0.0.1:8080.
        """
        options = Options()
        options.parseOptions([])
        self.assertTrue(os.path.exists(DEFAULT_CONFIG_PATH))
        self.assertEqual(options["gateway_config"].entrypoints["web"].address, "127.0.0.1:8080")

    def test_listen(self) -> None:
        """
        C{--listen} replaces the address of entrypoint C{web}.
        """
        options = Options()
        options.parseOptions(["--config", self.write(CONFIG), "--listen", "127.0.0.1:9999"])
        self.assertEqual(options["gateway_config"].entrypoints["web"].address, "127.0.0.1:9999")

    def test_missing_config(self) -> None:
        """
        A C{--config} naming a missing file is a usage error naming it; nothing falls back.
        """
        options = Options()
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", "nope.hcl"])
        self.assertEqual(str(e), "Config file not found: nope.hcl")

    def test_invalid_config(self) -> None:
        """
        An invalid configuration is a usage error naming the file, the key path and the problem.
        """
        path = self.write(CONFIG.replace('service = "svc"', 'service = "other"'))
        options = Options()
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertIn(path, str(e))
        self.assertIn("routers.all.service", str(e))
        self.assertIn("Router 'all' references unknown service 'other'", str(e))

    def test_make_service_with_config(self) -> None:
        """
        With a configuration file the service tree holds the gateway only.
        """
        options = Options()
        options.parseOptions(["--config", self.write(CONFIG)])
        service = makeService(options)
        children = list(IServiceCollection(service))
        self.assertEqual([type(child) for child in children], [Gateway])

    def test_make_service_embedded_default(self) -> None:
        """
        On the embedded default the demo upstreams start before the gateway.
        """
        options = Options()
        options.parseOptions([])
        children = list(IServiceCollection(makeService(options)))
        self.assertEqual([type(child) for child in children], [DemoUpstreams, Gateway])

    def test_workers_option(self) -> None:
        """
        C{--workers N} overrides the file's C{workers}; the tree then holds a supervisor of N
        workers in the gateway's place.
        """
        options = Options()
        path = self.write(CONFIG.replace("127.0.0.1:0", "127.0.0.1:8080") + "workers = 3\n")
        options.parseOptions(["--config", path, "--workers", "2"])
        self.assertEqual(options["gateway_config"].workers, 2)
        children = list(IServiceCollection(makeService(options)))
        self.assertEqual([type(child) for child in children], [WorkerSupervisor])
        supervisor = children[0]
        assert isinstance(supervisor, WorkerSupervisor)
        self.assertEqual(supervisor.count, 2)
        argv = supervisor.argv()
        self.assertEqual(argv[1:5], ["-m", "a3s_gateway.cli", "--config", os.path.abspath(path)])
        self.assertEqual(argv[5:], ["--worker-of", str(os.getpid())])

    def test_workers_option_validated(self) -> None:
        """
        C{--workers} is validated with the configuration: port 0 cannot be shared by workers.
        """
        options = Options()
        e = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--config", self.write(CONFIG), "--workers", "2"],
        )
        self.assertIn("workers > 1 needs a fixed port, not 0", str(e))

    def test_workers_embedded_default(self) -> None:
        """
        On the embedded default with workers, the supervisor runs the demo upstreams itself and
        its workers serve the packaged file.
        """
        options = Options()
        options.parseOptions(["--workers", "2", "--listen", "127.0.0.1:9999"])
        children = list(IServiceCollection(makeService(options)))
        self.assertEqual([type(child) for child in children], [DemoUpstreams, WorkerSupervisor])
        supervisor = children[1]
        assert isinstance(supervisor, WorkerSupervisor)
        self.assertEqual(
            supervisor.argv()[3:7], ["--config", DEFAULT_CONFIG_PATH, "--listen", "127.0.0.1:9999"]
        )


class TuneJitTests(SynchronousTestCase):
    """
    L{GatewayApplication.startService} sets PyPy's JIT parameters for a server.
    """

    def test_start_sets_jit_params(self) -> None:
        """
        On PyPy, starting the application sets L{JIT_PARAMS} (counters that do not decay)
        before its services start.
        """
        try:
            import pypyjit
        except ImportError:
            raise SkipTest("this interpreter has no JIT (CPython)") from None
        calls: list[str] = []

        class Starting(Service):
            def startService(self) -> None:
                Service.startService(self)
                calls.append("service started")

        # pypyjit's own setter, recorded instead of changing the JIT of the test process.
        self.patch(pypyjit, "set_param", lambda params: calls.append(f"set_param {params}"))
        application = GatewayApplication()
        Starting().setServiceParent(application)
        application.startService()
        self.addCleanup(application.stopService)
        self.assertEqual(calls, ["set_param decay=0", "service started"])
        self.assertEqual(JIT_PARAMS, "decay=0")

    def test_nothing_without_jit(self) -> None:
        """
        Where there is no PyPy JIT (CPython), tuning it does nothing and raises nothing.
        """
        if platform.python_implementation() == "PyPy":
            raise SkipTest("PyPy has a JIT")
        with self.assertRaises(ImportError):
            import pypyjit  # noqa: F401
        self.assertIsNone(tune_jit())


class NurseryTests(SynchronousTestCase):
    """
    L{gc_nursery}: the PyPy nursery size the C{a3s-gateway} command starts with, from the CPU's
    caches as Linux describes them.
    """

    def caches(self, *entries: tuple[str, int, str]) -> str:
        """
        A directory laid out as C{/sys/devices/system/cpu/cpu0/cache}, one C{index<N>} per
        C{(type, level, size)}.
        """
        root = self.mktemp()
        for number, (kind, level, size) in enumerate(entries):
            index = os.path.join(root, f"index{number}")
            os.makedirs(index)
            for name, value in (("type", kind), ("level", str(level)), ("size", size)):
                with open(os.path.join(index, name), "w") as f:
                    f.write(value + "\n")
        return root

    def test_half_the_last_level_cache(self) -> None:
        """
        The nursery is half the highest-level data or unified cache (the development VM's
        caches: 32 KiB L1 data and instruction, 1 MiB L2, 32 MiB L3).
        """
        caches = self.caches(
            ("Data", 1, "32K"),
            ("Instruction", 1, "32K"),
            ("Unified", 2, "1024K"),
            ("Unified", 3, "32768K"),
        )
        self.assertEqual(last_level_cache(caches), 32 * 2**20)
        self.assertEqual(gc_nursery({}, pypy=True, caches=caches), "16384KB")

    def test_bounds(self) -> None:
        """
        The nursery is at least 4 MiB (a machine described with a small last cache) and at most
        32 MiB (a large one).
        """
        small = self.caches(("Data", 1, "32K"), ("Unified", 2, "2M"))
        large = self.caches(("Unified", 2, "1024K"), ("Unified", 3, "256M"))
        self.assertEqual(gc_nursery({}, pypy=True, caches=small), "4096KB")
        self.assertEqual(gc_nursery({}, pypy=True, caches=large), "32768KB")

    def test_instruction_cache_ignored(self) -> None:
        """
        An instruction cache, even the highest-level one listed, does not size the nursery;
        a size without a unit is in bytes.
        """
        caches = self.caches(("Unified", 2, "16777216"), ("Instruction", 3, "64M"))
        self.assertEqual(last_level_cache(caches), 16 * 2**20)
        self.assertEqual(gc_nursery({}, pypy=True, caches=caches), "8192KB")

    def test_unreadable_entries_skipped(self) -> None:
        """
        An entry whose size or level cannot be read is skipped; with none readable the cache
        size is unknown and no nursery is chosen (PyPy's own choice stands).
        """
        caches = self.caches(("Unified", 2, "1024K"), ("Unified", 3, "lots"))
        self.assertEqual(last_level_cache(caches), 2**20)
        broken = self.caches(("Unified", 3, "lots"))
        self.assertIsNone(last_level_cache(broken))
        self.assertIsNone(gc_nursery({}, pypy=True, caches=broken))
        missing = os.path.join(self.mktemp(), "cache")
        self.assertIsNone(gc_nursery({}, pypy=True, caches=missing))

    def test_operator_choice_stands(self) -> None:
        """
        With C{PYPY_GC_NURSERY} already in the environment, none is chosen.
        """
        caches = self.caches(("Unified", 3, "32768K"))
        self.assertIsNone(gc_nursery({NURSERY_ENV: "1MB"}, pypy=True, caches=caches))

    def test_not_pypy(self) -> None:
        """
        Other interpreters get none: the variable means nothing to them.
        """
        caches = self.caches(("Unified", 3, "32768K"))
        self.assertIsNone(gc_nursery({}, pypy=False, caches=caches))


class FreezeHeapTests(SynchronousTestCase):
    """
    L{GatewayApplication.startService} freezes what start-up left on the heap.
    """

    def setUp(self) -> None:
        if not hasattr(gc, "freeze"):
            raise SkipTest("this interpreter has no gc.freeze (PyPy)")
        self.addCleanup(gc.unfreeze)

    def test_start_freezes_heap(self) -> None:
        """
        Once the application has started its services, an object made before, or by a service
        as it started, is out of the cyclic collector's reach (not among the objects it walks);
        one made after is not.
        """

        class Starting(Service):
            made: list[object]

            def startService(self) -> None:
                Service.startService(self)
                self.made = []

        before: list[object] = []
        application = GatewayApplication()
        child = Starting()
        child.setServiceParent(application)
        application.startService()
        self.addCleanup(application.stopService)
        after: list[object] = []
        walked = {id(o) for o in gc.get_objects()}
        self.assertNotIn(id(before), walked)
        self.assertNotIn(id(child.made), walked)
        self.assertIn(id(after), walked)
