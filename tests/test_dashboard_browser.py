"""
The dashboard page in a real headless Chromium, driven by Selenium, against a running gateway
with real backends on loopback: the page loads, shows the configured routers and services,
draws the traffic charts, turns a backend red when its health check fails, and shows a banner
when the admin API stops answering.

Selenium blocks, so it runs in a thread (C{deferToThread}) while the reactor serves the gateway;
every wait is bounded. Without Chromium, chromedriver or Selenium the test is skipped, except
under CI (C{CI} set), where it fails. With C{A3S_SCREENSHOT} set it runs longer and saves
C{docs/dashboard.png}.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer, reactor, threads
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.testing import EchoResource, FailingResource
from tests.support import backend, client, port_of, start_gateway

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECS = 30
SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "dashboard.png")

clock: IReactorTime = reactor  # type: ignore[assignment]


class _Switch(Resource):
    """A backend that answers like an C{EchoResource} until C{fail()}, then always 503."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.current: Resource = EchoResource(name)
        self._failing = FailingResource(503, name)

    def fail(self) -> None:
        """Answer 503 from now on (health checks included)."""
        self.current = self._failing

    def render(self, request: Request) -> Any:
        return self.current.render(request)


class _Jittery(Resource):
    """A backend answering C{200 {"ok": true}} after a random delay of 5 to 120 ms."""

    isLeaf = True

    def __init__(self, seed: int) -> None:
        Resource.__init__(self)
        self._random = random.Random(seed)

    def render(self, request: Request) -> Any:
        delay = self._random.choice([0.005, 0.01, 0.02, 0.03]) + self._random.random() * 0.09
        call = clock.callLater(delay, self._answer, request)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return NOT_DONE_YET

    @staticmethod
    def _answer(request: Request) -> None:
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"ok": true}')
        request.finish()


class _Traffic:
    """
    Sends requests through the gateway from the reactor: a few per 100 ms tick, at a rate that
    swells and ebbs, over the given paths in turn. Errors are expected (and ignored).
    """

    def __init__(self, port: int, paths: List[str], http: Any) -> None:
        self._base = f"http://127.0.0.1:{port}"
        self._paths = paths
        self._http = http
        self._tick = 0
        self._pending: List[defer.Deferred[Any]] = []
        self._loop = LoopingCall(self._send)
        self._loop.clock = clock

    def start(self) -> None:
        """Start sending."""
        self._loop.start(0.1)

    def stop(self) -> defer.Deferred[Any]:
        """Stop sending; fires when every request sent has ended."""
        if self._loop.running:
            self._loop.stop()
        return defer.DeferredList(list(self._pending))

    def _send(self) -> None:
        self._tick += 1
        burst = 1 + int(2.5 + 2.5 * math.sin(self._tick / 20))
        for i in range(burst):
            path = self._paths[(self._tick + i) % len(self._paths)]
            d = self._http.get(self._base + path)
            d.addCallback(lambda response: response.content())
            d.addErrback(lambda _: None)
            self._pending.append(d)
            d.addBoth(self._done, d)

    def _done(self, result: Any, d: defer.Deferred[Any]) -> Any:
        self._pending.remove(d)
        return result


def _config(api_1: str, api_2: str, llm: str, search_1: str, search_2: str) -> str:
    return f"""
entrypoints "web" {{
  address = "127.0.0.1:0"
}}
entrypoints "admin" {{
  address = "127.0.0.1:0"
}}
dashboard {{
  entrypoint = "admin"
}}
routers "health" {{
  rule     = "Path(`/healthz`)"
  service  = "api"
  priority = -10
}}
routers "api" {{
  rule        = "PathPrefix(`/api`)"
  service     = "api"
  middlewares = ["strip-api"]
}}
routers "chat" {{
  rule        = "PathPrefix(`/v1`) && (Method(`GET`) || Method(`POST`))"
  service     = "llm"
  entrypoints = ["web"]
  middlewares = ["llm-limit"]
}}
routers "search" {{
  rule     = "PathPrefix(`/search`)"
  service  = "search"
  priority = 10
}}
services "api" {{
  load_balancer {{
    servers = [{{ url = "{api_1}" }}, {{ url = "{api_2}" }}]
    health_check {{
      path                = "/health"
      interval            = "200ms"
      timeout             = "1s"
      unhealthy_threshold = 1
    }}
    # Only the health check marks api-1: passive health, on by default, would race it on the
    # traffic's 503s (the row then says "ejected", as it did once on PyPy).
    passive_health {{
      enabled = false
    }}
  }}
}}
services "llm" {{
  load_balancer {{
    strategy = "least-connections"
    servers  = [{{ url = "{llm}" }}]
  }}
}}
services "search" {{
  load_balancer {{
    strategy = "weighted"
    servers  = [{{ url = "{search_1}", weight = 3 }}, {{ url = "{search_2}" }}]
    passive_health {{
      error_threshold = 3
      window          = "10s"
      recovery_time   = "4s"
    }}
  }}
}}
middlewares "strip-api" {{
  type     = "strip-prefix"
  prefixes = ["/api"]
}}
middlewares "llm-limit" {{
  type  = "rate-limit"
  rate  = 1000
  burst = 1000
}}
"""


class _Page:
    """The Selenium side, run in a worker thread: every method blocks, every wait is bounded."""

    def __init__(self, url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1440,1000",
            "--force-prefers-reduced-motion",
        ]:
            options.add_argument(argument)
        self.driver = webdriver.Chrome(
            options=options, service=Service(executable_path=CHROMEDRIVER)
        )
        try:
            self.driver.set_page_load_timeout(WAIT_SECS)
            self.driver.get(url)
        except BaseException:
            self.driver.quit()
            raise

    def wait(self, what: str, condition: Callable[[Any], Any], timeout: float = WAIT_SECS) -> Any:
        """Wait for C{condition(driver)} to be truthy, at most C{timeout} seconds."""
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(condition, what)

    def css(self, selector: str) -> List[Any]:
        """The elements matching a CSS selector now."""
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def attributes(self, selector: str, name: str) -> List[Optional[str]]:
        """An attribute of every element matching C{selector}."""
        return [element.get_attribute(name) for element in self.css(selector)]

    def screenshot(self, path: str) -> None:
        """Save the whole page as a PNG."""
        # The window's height includes the browser's own frame: grow it by the page's height
        # beyond the viewport.
        extra = self.driver.execute_script(
            "return document.documentElement.scrollHeight - window.innerHeight"
        )
        size = self.driver.get_window_size()
        self.driver.set_window_size(size["width"], size["height"] + max(0, int(extra)))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.driver.save_screenshot(path)

    def quit(self) -> None:
        """Close the browser."""
        self.driver.quit()


def _missing_browser() -> Optional[str]:
    """What is missing to drive a browser (Chromium, chromedriver, Selenium), or C{None}."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        return "the dashboard browser test needs " + ", ".join(missing)
    return None


class DashboardBrowserTests(TestCase):
    """The dashboard page, live, in headless Chromium."""

    timeout = 300

    @defer.inlineCallbacks
    def test_live_dashboard(self) -> Any:
        """
        The page shows every configured router and service with its backends (all green at
        first) and draws the traffic; when a backend's health check starts failing its row
        turns red; when the admin API stops answering, an error banner appears.
        """
        missing = _missing_browser()
        if missing is not None:
            if os.environ.get("CI"):
                self.fail(missing + " (CI is set: failing instead of skipping)")
            raise SkipTest(missing)
        switch = _Switch("api-1")
        api_1 = backend(self, switch)
        api_2 = backend(self, EchoResource("api-2"))
        llm = backend(self, _Jittery(seed=7))
        search_1 = backend(self, EchoResource("search-1"))
        search_2 = backend(self, FailingResource(500, "search-2"))
        gateway = start_gateway(
            self, _config(api_1.url, api_2.url, llm.url, search_1.url, search_2.url)
        )
        dashboard = f"http://127.0.0.1:{port_of(gateway, 'admin')}/dashboard/"
        traffic = _Traffic(
            port_of(gateway),
            ["/api/users", "/v1/models", "/search?q=a", "/v1/chat", "/api/orders"],
            client(self),
        )
        traffic.start()
        self.addCleanup(traffic.stop)

        screenshot = bool(os.environ.get("A3S_SCREENSHOT"))

        def cut_admin() -> defer.Deferred[Any]:
            # The admin entrypoint goes away: its port closes and its connections drop.
            port = gateway.ports.pop("admin")
            for channel in list(gateway.sites["admin"].channels):
                channel.transport.abortConnection()  # type: ignore[union-attr]
            return defer.maybeDeferred(port.stopListening)

        def drive() -> Dict[str, Any]:
            from selenium.webdriver.common.by import By

            page = _Page(dashboard)
            seen: Dict[str, Any] = {}
            try:
                page.wait("the first update", lambda d: page.css("body[data-loaded]"))
                seen["routers"] = page.attributes("#routers tr[data-router]", "data-router")
                seen["services"] = page.attributes(".service[data-service]", "data-service")
                seen["backends"] = {
                    url: page.attributes(f'tr.backend[data-backend="{url}"]', "class")
                    for url in (api_1.url, api_2.url, llm.url, search_1.url)
                }
                seen["version"] = page.driver.find_element(By.ID, "version").text
                page.wait(
                    "a drawn request chart",
                    lambda d: (
                        page.css("#chart-requests path.line-requests")
                        and page.css("#chart-latency path.line-p99")
                    ),
                )
                if screenshot:
                    # A fuller picture for the README: most of a minute of traffic first.
                    time.sleep(45)
                threads.blockingCallFromThread(reactor, switch.fail)
                page.wait(
                    "the failing backend in red",
                    lambda d: page.css(f'tr.backend.unhealthy[data-backend="{api_1.url}"]'),
                )
                red = page.css(f'tr.backend[data-backend="{api_1.url}"] td.status')
                seen["red_status"] = red[0].text
                banner = page.driver.find_element(By.ID, "error-banner")
                seen["banner_before"] = banner.is_displayed()
                if screenshot:
                    page.screenshot(SCREENSHOT)
                threads.blockingCallFromThread(reactor, cut_admin)
                page.wait(
                    "the error banner",
                    lambda d: d.find_element(By.ID, "error-banner").is_displayed(),
                )
                seen["banner"] = page.driver.find_element(By.ID, "error-banner").text
            finally:
                page.quit()
            return seen

        seen = yield threads.deferToThread(drive)
        self.assertEqual(seen["routers"], ["health", "chat", "api", "search"])
        self.assertEqual(seen["services"], ["api", "llm", "search"])
        for url, classes in seen["backends"].items():
            self.assertEqual(len(classes), 1, url)
            self.assertIn("healthy", classes[0].split(), url)
        self.assertTrue(seen["version"].startswith("v"))
        self.assertEqual(seen["red_status"], "failing checks")
        self.assertFalse(seen["banner_before"])
        self.assertIn("Cannot reach the gateway's admin API", seen["banner"])
