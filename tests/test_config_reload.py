"""
Reloads and listeners: the file read off the reactor, empty files refused,
listeners that cannot bind (fatal at start-up, the old one kept on
reload), and a reload that leaves nothing listening said loudly.
"""

from __future__ import annotations

import socket
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from rproxy.config import config_from_mapping
from rproxy.service import ListenError, RProxyService
from tests.support import ServiceMixin, async_test, backends_config, connect, reactor


def taken_port(test: TestCase) -> int:
    """
    A loopback port something else listens on for the rest of C{test}.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    test.addCleanup(sock.close)
    return int(sock.getsockname()[1])


class ReloadTests(ServiceMixin, TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def logged(self, level: str = "error") -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") is not None
                and e["log_level"].name == level and e.get("log_namespace", "").startswith("rproxy.service")]

    def reloads(self, service: RProxyService, result: str) -> float:
        return service.registry.get_sample_value("rproxy_config_reloads_total", {"result": result}) or 0.0

    async def start_with_file(self, data: dict[str, Any]) -> tuple[RProxyService, str]:
        path = self.mktemp()
        data.setdefault("admin", {"listen": "tcp:0:interface=127.0.0.1"})
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        service = await self.start_service(data, config_path=path)
        return service, path

    async def echo_through(self, port: int) -> None:
        client = await connect(port)
        self.client_cleanup(client)
        await client.read_until(b"a\n")

    @async_test
    async def test_file_read_off_the_reactor(self) -> None:
        """reload_from_file returns before the file is parsed (a thread does it), then applies it."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        service, path = await self.start_with_file(data)
        data["frontends"].append({"name": "extra", "listen": "tcp:0:interface=127.0.0.1", "backend": "web"})
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        done = service.reload_from_file()
        self.assertNoResult(done)
        await done
        await self.echo_through(service.port_of("extra"))
        self.assertEqual(self.reloads(service, "ok"), 1)

    @async_test
    async def test_empty_file_keeps_running_configuration(self) -> None:
        """A reload of an empty file is refused: the frontend and the admin port stay."""
        _, backend = await self.backend("a")
        service, path = await self.start_with_file(backends_config(backend.getHost().port))
        front, admin = service.port_of("web"), service.admin_port
        for text in ("", "# nothing yet\n"):
            with open(path, "w") as f:
                f.write(text)
            await service.reload_from_file()
        self.assertEqual((service.port_of("web"), service.admin_port), (front, admin))
        await self.echo_through(front)
        self.assertEqual(self.reloads(service, "invalid"), 2)
        self.assertIn(f"reload rejected: {path}: holds no configuration (the file is empty or only comments); "
                      "a configuration is a mapping of sections (global, admin, backends, frontends, ...)",
                      self.logged())

    @async_test
    async def test_reloads_run_one_at_a_time(self) -> None:
        """Two reloads asked at once are applied in turn, the second after the first."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        service, path = await self.start_with_file(data)
        first = service.reload_from_file()
        second = service.reload_from_file()
        self.assertNoResult(second)
        await defer.gatherResults([first, second])
        self.assertEqual(self.reloads(service, "ok"), 2)

    @async_test
    async def test_new_address_in_use_keeps_old_listener(self) -> None:
        """A frontend moved to an address in use keeps its old listener; the reload reports it."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        service = await self.start_service(data)
        old = service.port_of("web")
        busy = taken_port(self)
        data["frontends"][0]["listen"] = f"127.0.0.1:{busy}"
        await service.reload(config_from_mapping(data))
        self.assertEqual(service.port_of("web"), old)
        await self.echo_through(old)
        line = (f"frontend web: cannot listen on tcp:{busy}:interface=127.0.0.1: Address already in use; "
                "keeping its listener on tcp:0:interface=127.0.0.1")
        self.assertEqual(service.listen_failures, {"web": line})
        self.assertEqual(self.reloads(service, "partial"), 1)
        self.assertIn(f"configuration reloaded, except 1 listener(s): {line}", self.logged())

    @async_test
    async def test_new_frontend_that_cannot_bind(self) -> None:
        """A new frontend that cannot bind is reported, makes rproxy unready, and is tried again on the next reload."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        service = await self.start_service(data)
        busy = taken_port(self)
        data["frontends"].append({"name": "extra", "listen": f"127.0.0.1:{busy}", "backend": "web"})
        await service.reload(config_from_mapping(data))
        self.assertNotIn("extra", service.frontends)
        self.assertEqual(service.readiness_problems(),
                         [f"frontend extra: cannot listen on tcp:{busy}:interface=127.0.0.1: Address already in use"])
        data["frontends"][1]["listen"] = "127.0.0.1:0"
        await service.reload(config_from_mapping(data))
        await self.echo_through(service.port_of("extra"))
        self.assertEqual(service.listen_failures, {})

    @async_test
    async def test_admin_moved_to_address_in_use(self) -> None:
        """The admin port moved to an address in use stays where it was."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        service = await self.start_service(data)
        admin = service.admin_port
        busy = taken_port(self)
        data["admin"] = {"listen": f"127.0.0.1:{busy}"}
        await service.reload(config_from_mapping(data))
        self.assertIs(service.admin_port, admin)
        self.assertEqual(self.reloads(service, "partial"), 1)
        data["admin"] = {"listen": "tcp:0:interface=127.0.0.1:backlog=10"}
        await service.reload(config_from_mapping(data))
        self.assertIsNot(service.admin_port, admin)

    @async_test
    async def test_same_socket_written_differently(self) -> None:
        """A listen string rewritten for the socket already bound keeps the listener (no bind beside itself)."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        service = await self.start_service(data)
        port = service.ports["web"]
        number = service.port_of("web")
        for listen in (f"127.0.0.1:{number}", f"tcp:{number}:interface=127.0.0.1:backlog=50",
                       f"tcp:port={number}:interface=127.0.0.1"):
            data["frontends"][0]["listen"] = listen
            await service.reload(config_from_mapping(data))
            self.assertEqual(service.listen_failures, {})
            self.assertIs(service.ports["web"], port)
        self.assertEqual(self.reloads(service, "ok"), 3)

    @async_test
    async def test_reload_while_stopping_is_ignored(self) -> None:
        """A SIGHUP during the drain does not open listeners again."""
        _, backend = await self.backend("a")
        service, path = await self.start_with_file(backends_config(backend.getHost().port))
        client = await connect(service.port_of("web"))
        self.client_cleanup(client)
        await client.read_until(b"a\n")
        stopped = service.stopService()
        await service.reload_from_file()
        self.assertEqual((service.frontends, service.ports), ({}, {}))
        self.assertIn("reload ignored: rproxy is stopping", [formatEvent(e) for e in self.events])
        client.transport.loseConnection()
        await stopped

    @async_test
    async def test_reload_removing_every_listener_is_loud(self) -> None:
        """A reload that removes every frontend and tunnel is applied, and logged as an error."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        service = await self.start_service(data)
        data["frontends"] = []
        await service.reload(config_from_mapping(data))
        self.assertEqual(service.frontends, {})
        self.assertIn("reload removes every frontend and tunnel (frontend web): only the admin port will listen; "
                      "applying it as asked", self.logged())


class StartTests(ServiceMixin, TestCase):
    timeout = 30

    @async_test
    async def test_bind_failure_at_start_is_fatal(self) -> None:
        """privilegedStartService raises ListenError naming the frontend and address, after the hook."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        busy = taken_port(self)
        data["frontends"][0]["listen"] = f"127.0.0.1:{busy}"
        data["admin"] = {"listen": "127.0.0.1:0"}
        service = RProxyService(config_from_mapping(data), reactor, registry=CollectorRegistry())
        seen: list[ListenError] = []
        service.on_start_failure = seen.append
        self.addCleanup(lambda: service.stopService() if service.running else None)
        error = self.assertRaises(ListenError, service.privilegedStartService)
        line = f"frontend web: cannot listen on tcp:{busy}:interface=127.0.0.1: Address already in use; not starting"
        self.assertEqual(error.problems, [line])
        self.assertEqual(seen, [error])
        self.assertIsNone(service.admin_port)  # nothing more is bound once start-up has failed
        for pool in service.pools.values():
            pool.close()
        for checker in service.checkers.values():
            checker.stop()

    @async_test
    async def test_start_binds_before_start_service(self) -> None:
        """privilegedStartService binds every listener (before twistd reports the start); startService binds none again."""
        _, backend = await self.backend("a")
        data = backends_config(backend.getHost().port)
        data.update(admin={"listen": "127.0.0.1:0"}, **{"global": {"grace_period": "1s"}})
        service = RProxyService(config_from_mapping(data), reactor, registry=CollectorRegistry())
        service.privilegedStartService()
        self.assertIn("web", service.ports)
        ports = dict(service.ports)
        service.startService()
        self.addCleanup(self._stop_service, service)
        await service.ready
        self.assertEqual(service.ports, ports)
        client = await connect(service.port_of("web"))
        self.client_cleanup(client)
        await client.read_until(b"a\n")
