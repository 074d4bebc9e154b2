"""
The dashboard in a real browser: headless Chromium (Debian's
C{/usr/bin/chromium}, driven by Playwright in a thread while the reactor
serves) against rproxy with two HTTP servers behind it.

The page must load with no console error, show a server going down within
5 s of its health check failing, and its drain button must drain the
server (the next requests avoid it).  Screenshots at a laptop's and a
phone's width go to C{/work/screens/} when that directory can be made.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from rproxy.tunnel.wire import Heartbeat, Login
from tests.support import ServiceMixin, async_test, connect, listen, wait_for
from tests.test_e2e_tunnel import FakeAgent

CHROMIUM = "/usr/bin/chromium"
SCREENS = "/work/screens"
KEY = "console-test-key"


class NamedServer(Resource):
    """
    Answers every request with its name; C{/health} is 200 while
    C{healthy}, else 503.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.healthy = True
        self.served = 0

    def render(self, request: Any) -> bytes:
        if request.path == b"/health":
            request.setResponseCode(200 if self.healthy else 503)
            return b"ok" if self.healthy else b"failing"
        self.served += 1
        request.setHeader(b"content-type", b"text/plain")
        return self.name.encode()


class QuietSite(Site):
    noisy = False

    def log(self, request: Any) -> None:
        pass


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def _drive(admin: str, proxy: str, servers: dict[str, NamedServer], screens: str | None) -> dict[str, Any]:
    """
    The browser's part (blocking: run in a thread while the reactor serves).
    """
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    out: dict[str, Any] = {"errors": errors}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, timeout=60_000, args=["--no-proxy-server"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.goto(admin + "/", wait_until="load", timeout=30_000)
            # the key, asked once, kept for the tab and never in the URL
            page.wait_for_selector("#key", state="visible", timeout=10_000)
            page.fill("#key", KEY)
            page.click("#keyform button[type=submit]")
            # (selectors, not wait_for_function: the page's policy forbids eval)
            state = "tr[data-backend=web][data-server={}] td.state.{}"
            page.wait_for_selector(state.format("a", "up"), timeout=10_000)
            page.wait_for_selector(state.format("b", "up"), timeout=10_000)
            out["stored_key"] = page.evaluate("sessionStorage.getItem('rproxy-admin-key')")
            out["url"] = page.url

            # a failing check: the row says down within 5 s
            failed_at = time.monotonic()
            servers["a"].healthy = False
            page.wait_for_selector(state.format("a", "down"), timeout=5_000)
            out["down_after"] = time.monotonic() - failed_at
            out["reason"] = page.inner_text("tr[data-server=a] td.reason")
            servers["a"].healthy = True
            page.wait_for_selector(state.format("a", "up"), timeout=10_000)

            # traffic, so that the frontend's figures and chart have something
            for _ in range(20):
                _fetch(proxy + "/warm")
            page.click("tr[data-server=b] button.drain")
            page.wait_for_selector(state.format("b", "draining"), timeout=5_000)
            out["after_drain"] = [_fetch(proxy + f"/next/{i}") for i in range(8)]
            for _ in range(50):
                out["rps"] = page.inner_text("[data-key=web] .rps")
                if out["rps"] not in ("–", "0.0"):
                    break
                page.wait_for_timeout(100)
            out["message"] = page.inner_text("#message")
            page.wait_for_selector("#agents tbody tr[data-key='gpu/gpu-01']", timeout=5_000)
            out["agent"] = page.inner_text("#agents tbody tr[data-key='gpu/gpu-01']").split("\t")
            if screens is not None:
                page.screenshot(path=os.path.join(screens, "dashboard-laptop.png"), full_page=True)
                page.set_viewport_size({"width": 390, "height": 844})
                page.wait_for_timeout(300)
                page.screenshot(path=os.path.join(screens, "dashboard-phone.png"), full_page=True)
                out["phone_overflow"] = page.evaluate(
                    "document.documentElement.scrollWidth > document.documentElement.clientWidth")
        finally:
            browser.close()
    return out


class DashboardBrowserTests(ServiceMixin, TestCase):
    timeout = 180

    @async_test
    async def test_dashboard_in_chromium(self) -> None:
        """
        Chromium loads the dashboard with no console error, asks for the
        key once (kept in sessionStorage, not in the URL), shows a server
        down within 5 s of its check failing, and its drain button sends
        the next requests to the other server.
        """
        servers = {name: NamedServer(name) for name in ("a", "b")}
        ports = {}
        for name, resource in servers.items():
            port = await listen(QuietSite(resource))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        service = await self.start_service({
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": KEY},
            "api_keys": [{"key": "agent-key", "level": -1, "name": "shared"}],
            "tunnels": [{"name": "gpu", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
            "backends": [{"name": "web", "servers": [{"address": f"127.0.0.1:{ports[n]}", "name": n}
                                                     for n in ("a", "b")],
                          "health_check": {"type": "http", "path": "/health", "interval": "500ms",
                                           "timeout": "400ms", "rise": 1, "fall": 1}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        })
        await wait_for(lambda: all(s.last_check_ok for s in service.pools["web"].servers))
        agent = FakeAgent()
        await connect(service.tunnels["gpu"].port_of("control"), agent)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if agent.lost else agent.transport.abortConnection())
        agent.send(Login(agent_id="gpu-01", api_key="agent-key", models=("llama3", "qwen2")))
        agent.send(Heartbeat(cpu=42.5, memory=61.0, disk=30.0, active_streams=0))
        admin = f"http://127.0.0.1:{service.admin_port.getHost().port}"  # type: ignore[union-attr]
        proxy = f"http://127.0.0.1:{service.port_of('web')}"
        screens: str | None = SCREENS
        try:
            os.makedirs(SCREENS, exist_ok=True)
        except OSError:
            screens = None
        result = await deferToThread(_drive, admin, proxy, servers, screens)
        self.assertEqual(result["errors"], [])
        self.assertEqual((result["stored_key"], KEY in result["url"]), (KEY, False))
        self.assertLess(result["down_after"], 5.0)
        self.assertEqual(result["reason"], "http check failed: status 503, expected 200")
        self.assertEqual(result["after_drain"], ["a"] * 8)
        self.assertEqual(result["message"], "web/b: state drain")
        self.assertGreater(float(result["rps"]), 0)
        self.assertEqual(result["agent"][:8], ["gpu", "gpu-01", "shared (level -1)", "llama3, qwen2", "42.5%",
                                               "61.0%", "30.0%", "0"])
        if screens is not None:
            self.assertFalse(result["phone_overflow"])
        b = service.pools["web"].server("b")
        self.assertEqual((b.admin_state, b.active), ("drain", 0))  # type: ignore[union-attr]
        stats = json.loads(await deferToThread(
            lambda: urllib.request.urlopen(urllib.request.Request(
                admin + "/api/v1/servers/web/b", headers={"Authorization": f"Bearer {KEY}"}), timeout=5).read()))
        self.assertEqual(stats["state"], "draining")
