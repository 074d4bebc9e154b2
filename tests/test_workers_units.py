"""
Tests for the pure parts of L{rproxy.workers}: the worker count, the
control channel's codec, restart backoff, each process's part of a
configuration, the merge of figures and cross-process server state.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rproxy.config import ConfigError, parse_config
from rproxy.pool import Pool
from rproxy.workers import worker_count
from rproxy.workers.channel import Channel
from rproxy.workers.merge import (
    add_totals,
    carry_counters,
    carry_totals,
    merge_agents,
    merge_health,
    merge_pools,
    merge_tunnel_rows,
    sum_metrics,
    totals,
)
from rproxy.workers.state import admin_message, apply_ejection, apply_message, snapshot
from rproxy.workers.supervise import RestartBackoff
from rproxy.workers.views import (
    master_view,
    serving_slots,
    shared_listeners,
    tunnels_in_workers,
    worker_proxy,
    worker_view,
)
from rproxy.workers.wire import Decoder, WireError, encode, pack_config, unpack_config


def data(**global_: object) -> dict[str, object]:
    return {
        "global": global_,
        "backends": [{"name": "web", "servers": ["127.0.0.1:9001", "127.0.0.1:9002"]}],
        "frontends": [{"name": "web", "listen": "tcp:8080", "backend": "web"}],
    }


class WorkerCountTests(SynchronousTestCase):
    def test_number(self) -> None:
        """global.workers: N runs N workers."""
        self.assertEqual(worker_count(parse_config(data(workers=3))), 3)

    def test_default_is_one(self) -> None:
        """Without global.workers, one process."""
        self.assertEqual(worker_count(parse_config(data())), 1)

    def test_auto_counts_usable_cores(self) -> None:
        """auto is one worker per core this process may use."""
        config = parse_config(data(workers="auto"))
        self.assertEqual(config.global_.workers, "auto")
        self.assertEqual(worker_count(config, cores=lambda: 6), 6)

    def test_bad_values_name_the_key(self) -> None:
        """A count that is not 1..1024 or auto is refused with its key path."""
        for value, shown in [(0, "an integer 0"), ("many", "a string 'many'"), (True, "a boolean True"),
                             (1025, "an integer 1025")]:
            error = self.assertRaises(ConfigError, parse_config, data(workers=value))
            self.assertEqual(error.errors, [f"global.workers: expected an integer from 1 to 1024 or 'auto', "
                                            f"got {shown}"])


class WireTests(SynchronousTestCase):
    def test_round_trip_across_reads(self) -> None:
        """Messages split anywhere come out whole, in order."""
        raw = encode({"op": "a", "n": 1}) + encode({"op": "b", "text": "x\ny"})
        decoder = Decoder()
        got = []
        for i in range(len(raw)):
            got += decoder.feed(raw[i:i + 1])
        self.assertEqual(got, [{"op": "a", "n": 1}, {"op": "b", "text": "x\ny"}])

    def test_line_too_long(self) -> None:
        """A line past the limit is an error, not a growing buffer."""
        decoder = Decoder(max_line=10)
        self.assertRaises(WireError, decoder.feed, b"x" * 11)

    def test_not_a_message(self) -> None:
        """Lines that are not JSON objects with an op are errors."""
        for line in (b"{nope\n", b"[1]\n", b'{"op": 3}\n'):
            self.assertRaises(WireError, Decoder().feed, line)

    def test_config_travels(self) -> None:
        """A configuration packed by the master is equal once unpacked."""
        config = parse_config(data(workers=2))
        self.assertEqual(unpack_config(pack_config(config)), config)


class ChannelTests(SynchronousTestCase):
    def test_request_answered(self) -> None:
        """A request fires with the message that replies to its id; others go to the handler."""
        handled: list[dict[str, object]] = []
        channel = Channel(handled.append, lambda reason: None)
        transport = StringTransport()
        channel.makeConnection(transport)
        clock = Clock()
        d = channel.request({"op": "report"}, 2, clock)
        sent = Decoder().feed(transport.value())
        self.assertEqual(sent, [{"op": "report", "id": 1}])
        channel.dataReceived(encode({"op": "ejected", "pool": "p"}) + encode({"op": "report", "reply_to": 1, "x": 2}))
        self.assertEqual(self.successResultOf(d), {"op": "report", "reply_to": 1, "x": 2})
        self.assertEqual(handled, [{"op": "ejected", "pool": "p"}])

    def test_request_times_out(self) -> None:
        """A request nobody answers fails after its timeout; a late answer is dropped."""
        handled: list[dict[str, object]] = []
        channel = Channel(handled.append, lambda reason: None)
        channel.makeConnection(StringTransport())
        clock = Clock()
        d = channel.request({"op": "report"}, 2, clock)
        clock.advance(2)
        self.failureResultOf(d)
        channel.dataReceived(encode({"op": "report", "reply_to": 1}))
        self.assertEqual(handled, [])

    def test_garbage_closes(self) -> None:
        """Bytes that are not messages close the channel."""
        channel = Channel(lambda message: None, lambda reason: None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"garbage\n")
        self.assertTrue(transport.disconnecting)


class BackoffTests(SynchronousTestCase):
    def test_doubles_to_the_maximum(self) -> None:
        """Deaths in a row wait 0.5, 1, 2 ... seconds, never more than 30."""
        backoff = RestartBackoff()
        self.assertEqual([backoff.died(0.1) for _ in range(8)], [0.5, 1, 2, 4, 8, 16, 30, 30])

    def test_stable_run_starts_afresh(self) -> None:
        """A worker that ran for the stable period is restarted after the first delay again."""
        backoff = RestartBackoff()
        backoff.died(1)
        backoff.died(1)
        self.assertEqual(backoff.died(10), 0.5)
        self.assertEqual(backoff.died(1), 1)


class ViewTests(SynchronousTestCase):
    def tokens(self, credentials: int) -> object:
        raw = data(workers=3)
        raw["token_pools"] = [{"name": "t", "upstream": {"address": "127.0.0.1:8848"},
                               "credentials": [{"username": f"u{i}", "password": "p"} for i in range(credentials)]}]
        raw["frontends"] = [{"name": "web", "listen": "tcp:8080", "backend": "web"},
                            {"name": "api", "listen": "tcp:8081", "backend": "web", "protocol": "http",
                             "token_pool": "t"}]
        return parse_config(raw)

    def test_credentials_partitioned(self) -> None:
        """Each credential belongs to exactly one worker."""
        config = self.tokens(7)
        shares = [[c.username for c in worker_view(config, slot, 3).token_pools[0].credentials] for slot in range(3)]
        self.assertEqual(shares, [["u0", "u3", "u6"], ["u1", "u4"], ["u2", "u5"]])

    def test_fewer_credentials_than_workers(self) -> None:
        """With fewer credentials than workers, only workers holding one serve the token-pool frontend."""
        config = self.tokens(2)
        api = config.frontends[1]
        self.assertEqual(serving_slots(config, api, 3), range(2))
        self.assertEqual(serving_slots(config, config.frontends[0], 3), range(3))
        third = worker_view(config, 2, 3)
        self.assertEqual([f.name for f in third.frontends], ["web"])
        self.assertEqual(third.token_pools, ())

    def test_connection_limits_are_the_machines(self) -> None:
        """A frontend's and the global max_connections are split over the workers; no worker has 0 (none)."""
        raw = data(workers=3, max_connections=1000)
        raw["frontends"] = [{"name": "web", "listen": "tcp:8080", "backend": "web", "max_connections": 10},
                            {"name": "two", "listen": "tcp:8081", "backend": "web", "max_connections": 2},
                            {"name": "free", "listen": "tcp:8082", "backend": "web"}]
        config = parse_config(raw)
        views = [worker_view(config, slot, 3) for slot in range(3)]
        self.assertEqual([v.global_.max_connections for v in views], [334, 333, 333])
        limits = [{f.name: f.max_connections for f in v.frontends} for v in views]
        self.assertEqual(limits, [{"web": 4, "two": 1, "free": 0}, {"web": 3, "two": 1, "free": 0},
                                  {"web": 3, "free": 0}])
        self.assertEqual(serving_slots(config, config.frontends[1], 3), range(2))
        self.assertEqual(sum(f.max_connections for v in views for f in v.frontends if f.name == "web"), 10)
        tiny = parse_config(data(workers=3, max_connections=2))
        self.assertEqual([worker_view(tiny, slot, 3).global_.max_connections for slot in range(3)], [1, 1, 1])

    def test_master_and_worker_parts(self) -> None:
        """The master runs no frontend or token pool; workers no tunnel or admin port."""
        config = attrs.evolve(self.tokens(2), tunnels=("a tunnel",))
        master = master_view(config)
        self.assertEqual((master.frontends, master.token_pools, master.tunnels), ((), (), ("a tunnel",)))
        worker = worker_view(config, 0, 3)
        self.assertEqual((worker.tunnels, worker.admin.listen), ((), None))
        self.assertEqual(worker.backends, config.backends)

    def cluster(self, proxy: str = "tcp:17001:interface=10.0.0.5", advertise: str = "10.0.0.5:17001") -> object:
        raw = data(workers=2)
        raw["stores"] = {"redis": {"url": "redis://127.0.0.1:6379/0"}}
        raw["api_keys"] = [{"key": "k"}]
        raw["tunnels"] = [{"name": "gpu", "control": "tcp:17000", "proxy": proxy, "public": "tcp:18080"}]
        raw["cluster"] = {"node_id": "edge", "advertise": {"proxy": advertise}}
        return parse_config(raw)

    def test_cluster_tunnels_in_every_worker(self) -> None:
        """
        With a cluster, the workers run the tunnels, each a node of its
        own (C{<node_id>-w<slot>}) with a proxy port of its own (the
        configured one plus the slot) that it advertises; the master runs
        none and binds the control and public sockets for every worker.
        """
        config = self.cluster()
        self.assertTrue(tunnels_in_workers(config))
        self.assertEqual(master_view(config).tunnels, ())
        views = [worker_view(config, slot, 2) for slot in range(2)]
        self.assertEqual([v.cluster.node_id for v in views], ["edge-w0", "edge-w1"])
        self.assertEqual([v.cluster.advertise_proxy for v in views], [("10.0.0.5", 17001), ("10.0.0.5", 17002)])
        self.assertEqual([v.tunnels[0].proxy for v in views],
                         ["tcp:17001:interface=10.0.0.5", "tcp:17002:interface=10.0.0.5"])
        self.assertEqual([(v.tunnels[0].control, v.tunnels[0].public) for v in views],
                         [("tcp:17000", "tcp:18080")] * 2)
        self.assertEqual([(name, listen, list(slots)) for name, listen, slots in shared_listeners(config, 2)], [
            ("web", "tcp:8080", [0, 1]), ("tunnel gpu control", "tcp:17000", [0, 1]),
            ("tunnel gpu public", "tcp:18080", [0, 1])])

    def test_cluster_port_zero_stays_zero(self) -> None:
        """Proxy port 0 (and advertised port 0): each worker's own port, chosen as it binds."""
        config = self.cluster("tcp:0:interface=127.0.0.1", "127.0.0.1:0")
        view = worker_view(config, 1, 2)
        self.assertEqual((view.tunnels[0].proxy, view.cluster.advertise_proxy),
                         ("tcp:0:interface=127.0.0.1", ("127.0.0.1", 0)))
        self.assertEqual(worker_proxy("tcp6:9000:interface=\\:\\:1", 3), "tcp6:9003:interface=\\:\\:1")

    def test_no_cluster_tunnels_in_master(self) -> None:
        """Without a cluster, the master holds the tunnels and binds no socket of theirs."""
        config = attrs.evolve(self.cluster(), cluster=None)
        self.assertFalse(tunnels_in_workers(config))
        self.assertEqual(len(master_view(config).tunnels), 1)
        self.assertEqual(worker_view(config, 0, 2).tunnels, ())
        self.assertEqual([name for name, _, _ in shared_listeners(config, 2)], ["web"])


METRICS_A = """\
# HELP rproxy_frontend_connections_total Client connections accepted
# TYPE rproxy_frontend_connections_total counter
rproxy_frontend_connections_total{frontend="web"} 3.0
# HELP rproxy_server_up 1 when the server can take connections
# TYPE rproxy_server_up gauge
rproxy_server_up{backend="web",server="a"} 1.0
# HELP rproxy_http_request_duration_seconds Time
# TYPE rproxy_http_request_duration_seconds histogram
rproxy_http_request_duration_seconds_bucket{le="0.1"} 2.0
rproxy_http_request_duration_seconds_bucket{le="+Inf"} 3.0
rproxy_http_request_duration_seconds_sum 0.5
rproxy_http_request_duration_seconds_count 3.0
# HELP rproxy_reloads_total Reloads
# TYPE rproxy_reloads_total counter
rproxy_reloads_total{outcome="ok"} 1.0
rproxy_reloads_created{outcome="ok"} 1.7e+09
"""
METRICS_B = """\
# HELP rproxy_frontend_connections_total Client connections accepted
# TYPE rproxy_frontend_connections_total counter
rproxy_frontend_connections_total{frontend="web"} 4.0
rproxy_frontend_connections_total{frontend="l4"} 1.0
# HELP rproxy_server_up 1 when the server can take connections
# TYPE rproxy_server_up gauge
rproxy_server_up{backend="web",server="a"} 0.0
# HELP rproxy_http_request_duration_seconds Time
# TYPE rproxy_http_request_duration_seconds histogram
rproxy_http_request_duration_seconds_bucket{le="0.1"} 1.0
rproxy_http_request_duration_seconds_bucket{le="+Inf"} 1.0
rproxy_http_request_duration_seconds_sum 0.25
rproxy_http_request_duration_seconds_count 1.0
"""


class MergeTests(SynchronousTestCase):
    def test_sum_metrics(self) -> None:
        """Counters and histograms add up; up-gauges take the lowest; creation times are dropped."""
        self.assertEqual(sum_metrics([METRICS_A, METRICS_B]).splitlines(), [
            "# HELP rproxy_frontend_connections_total Client connections accepted",
            "# TYPE rproxy_frontend_connections_total counter",
            'rproxy_frontend_connections_total{frontend="web"} 7',
            'rproxy_frontend_connections_total{frontend="l4"} 1',
            "# HELP rproxy_server_up 1 when the server can take connections",
            "# TYPE rproxy_server_up gauge",
            'rproxy_server_up{backend="web",server="a"} 0',
            "# HELP rproxy_http_request_duration_seconds Time",
            "# TYPE rproxy_http_request_duration_seconds histogram",
            'rproxy_http_request_duration_seconds_bucket{le="0.1"} 3',
            'rproxy_http_request_duration_seconds_bucket{le="+Inf"} 4',
            "rproxy_http_request_duration_seconds_sum 0.75",
            "rproxy_http_request_duration_seconds_count 4",
            "# HELP rproxy_reloads_total Reloads",
            "# TYPE rproxy_reloads_total counter",
            'rproxy_reloads_total{outcome="ok"} 1',
        ])

    def test_carry_counters(self) -> None:
        """
        What dead processes counted: counters and histograms summed,
        gauges (a dead process's state) and creation times left out.
        """
        carried = carry_counters(carry_counters("", METRICS_A), METRICS_B)
        self.assertEqual(carried, sum_metrics([METRICS_A, METRICS_B], kinds=frozenset({"counter", "histogram"})))
        self.assertNotIn("rproxy_server_up", carried)
        self.assertIn('rproxy_frontend_connections_total{frontend="web"} 7\n', carried)
        self.assertIn('rproxy_http_request_duration_seconds_bucket{le="+Inf"} 4\n', carried)
        self.assertIn("rproxy_http_request_duration_seconds_sum 0.75\n", carried)

    def test_totals_are_counters_only(self) -> None:
        """
        The JSON views' counters (connections, connect failures, bytes,
        answers, durations, streams) are carried; gauges (open connections,
        waiting, a token pool's sessions) are not.
        """
        report = worker_answer("report", 100, connections=5, active=2, requests=3)
        report["health"]["token_pools"] = {"t": {"status": "healthy", "pool": {"total": 3, "waiting": 1}}}
        sample = worker_answer("console", 100, connections=5, active=2, requests=3)
        sample["token_pools"] = [{"name": "t", "total": 3, "in_use": 1, "available": 2, "waiting": 0}]
        sample["tunnels"] = [{"name": "gpu", "agents": [], "streams_opened": 7, "streams_failed": 1}]
        counted = carry_totals(totals(report), totals({"console": sample}))
        self.assertEqual({k: v for k, v in counted.items() if v}, {
            ("health", "frontends", "web", "total_connections"): 5,
            ("health", "web", SERVER, "total_connections"): 5, ("health", "web", SERVER, "connect_failures"): 1,
            ("stats", "web", SERVER, "total_connections"): 5, ("stats", "web", SERVER, "connect_failures"): 1,
            ("stats", "web", SERVER, "bytes_in"): 50, ("stats", "web", SERVER, "bytes_out"): 100,
            ("console", "frontends", "web", "total"): 5, ("console", "frontends", "web", "connect_errors"): 1,
            ("console", "frontends", "web", "classes", 1): 3, ("console", "frontends", "web", "durations", 0): 3,
            ("console", "web", SERVER, "total_connections"): 5, ("console", "web", SERVER, "connect_failures"): 1,
            ("console", "tunnels", "gpu", "streams_opened"): 7, ("console", "tunnels", "gpu", "streams_failed"): 1,
        })
        view = {"console": worker_answer("console", 101, connections=1, active=1, requests=1)}
        add_totals(view, counted)
        [row] = view["console"]["frontends"]
        self.assertEqual((row["total"], row["active"], row["classes"][1], row["durations"][0]), (6, 1, 4, 4))
        self.assertEqual(view["console"]["backends"][0]["servers"][0]["active_connections"], 1)
        self.assertEqual(view["console"]["backends"][0]["waiting"], 1)

    def pool(self, state: str, active: int, total: int) -> dict[str, object]:
        return {"name": "web", "waiting": 1, "backends": [
            {"server_id": "a", "state": state, "active_connections": active, "total_connections": total,
             "connect_failures": 0, "bytes_in": 10, "bytes_out": 20}]}

    def test_merge_pools(self) -> None:
        """State comes from the master, counts are the workers' sum."""
        merged = merge_pools([self.pool("down", 0, 0)], [[self.pool("up", 2, 5)], [self.pool("up", 1, 4)]])
        self.assertEqual(merged, [{"name": "web", "waiting": 2, "backends": [
            {"server_id": "a", "state": "down", "active_connections": 3, "total_connections": 9,
             "connect_failures": 0, "bytes_in": 20, "bytes_out": 40}]}])

    def test_merge_health_backends(self) -> None:
        """
        /health's backends (L{Pool.describe}: servers by name) keep the
        master's state and sum the workers' connection counts.
        """
        raw = data()
        raw["backends"] = [{"name": "web", "servers": ["127.0.0.1:9001"]}]
        clock = Clock()
        master = Pool(parse_config(raw).backends[0], clock)
        workers = [Pool(parse_config(raw).backends[0], clock) for _ in range(2)]
        master.servers[0].up = False
        for pool, count in zip(workers, (2, 3), strict=True):
            pool.servers[0].total = count
        merged = merge_health({"status": "ok", "problems": [], "backends": [master.describe()]},
                              [{"backends": [p.describe()]} for p in workers], [])
        [server] = merged["backends"][0]["servers"]
        self.assertEqual((server["name"], server["healthy"], server["total_connections"]),
                         ("127.0.0.1:9001", False, 5))
        self.assertNotIn("bytes_in", server)

    def test_merge_health(self) -> None:
        """Frontends are summed over workers; a worker's problem makes the machine degraded once."""
        frontend = {"name": "web", "listening": True, "active_connections": 1, "waiting": 0, "total_connections": 2}
        worker = {"problems": ["frontend web: no server of backend web is up"], "frontends": [frontend],
                  "backends": [], "token_pools": {"t": {"status": "unavailable", "pool": {"total": 0}, "name": "t"}}}
        other = dict(worker, token_pools={"t": {"status": "healthy", "pool": {"total": 3}, "name": "t"}})
        merged = merge_health({"status": "ok", "problems": [], "backends": [], "stores": "embedded"},
                              [worker, other], ["worker 2: not running"])
        self.assertEqual(merged["status"], "degraded")
        self.assertEqual(merged["problems"], ["worker 2: not running", "frontend web: no server of backend web is up"])
        self.assertEqual(merged["frontends"], [dict(frontend, active_connections=2, total_connections=4, workers=2)])
        self.assertEqual(merged["token_pools"], {"t": {"status": "healthy", "pool": {"total": 3}, "name": "t"}})
        self.assertEqual(merged["stores"], "embedded")


class StateTests(SynchronousTestCase):
    def setUp(self) -> None:
        raw = data()
        raw["backends"] = [{"name": "web", "servers": ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"],
                            "passive": {"consecutive_failures": 1}}]
        self.clock = Clock()
        self.pool = Pool(parse_config(raw).backends[0], self.clock)

    def test_ejection_from_elsewhere(self) -> None:
        """An ejection another process saw takes the server out here until it ends."""
        self.assertEqual(self.pool.pick().name, "127.0.0.1:9001")  # type: ignore[union-attr]
        self.assertTrue(apply_ejection(self.pool, "127.0.0.1:9002", 30, 1))
        picked = {self.pool.pick().name for _ in range(6)}  # type: ignore[union-attr]
        self.assertEqual(picked, {"127.0.0.1:9001", "127.0.0.1:9003"})
        self.assertFalse(apply_ejection(self.pool, "127.0.0.1:9002", 20, 1))
        self.clock.advance(30)
        picked = {self.pool.pick().name for _ in range(6)}  # type: ignore[union-attr]
        self.assertEqual(len(picked), 3)

    def test_snapshot_replays(self) -> None:
        """A new process brought up with the snapshot sees what the master sees."""
        server = self.pool.servers[0]
        self.pool.set_up(server, False, "connection refused")
        self.pool.record_failure(self.pool.servers[1], "refused")
        self.clock.advance(1)
        messages = snapshot({"web": self.pool}, self.clock.seconds())
        self.assertEqual(messages, [
            {"op": "health", "pool": "web", "server": "127.0.0.1:9001", "up": False, "reason": "connection refused"},
            {"op": "eject", "pool": "web", "server": "127.0.0.1:9002", "until_in": 29.0, "ejections": 1},
        ])
        other = Pool(self.pool.config, self.clock)
        for message in messages:
            self.assertTrue(apply_message({"web": other}, message, self.clock.seconds()))
        self.assertEqual([s.state(self.clock.seconds()) for s in other.servers], ["down", "ejected", "up"])
        self.assertFalse(apply_message({"gone": other}, messages[0], 0))

    def test_operator_state_travels(self) -> None:
        """A drain and a weight set in the master reach a new process's pool, quietly, and stay applied once."""
        self.pool.set_admin("127.0.0.1:9003", "drain", 5)
        messages = snapshot({"web": self.pool}, self.clock.seconds())
        self.assertEqual(messages, [{"op": "admin", "pool": "web", "server": "127.0.0.1:9003", "state": "drain",
                                     "weight": 5}])
        other = Pool(self.pool.config, self.clock)
        self.assertTrue(apply_message({"web": other}, messages[0], 0))
        self.assertFalse(apply_message({"web": other}, messages[0], 0))
        drained = other.servers[2]
        self.assertEqual((drained.admin_state, drained.weight, drained.weight_set), ("drain", 5, True))
        picked = {other.pick().name for _ in range(6)}  # type: ignore[union-attr]
        self.assertEqual(picked, {"127.0.0.1:9001", "127.0.0.1:9002"})


class SupervisorTests(SynchronousTestCase):
    """
    L{MasterService.worker_ended} on a fake clock: a dead worker is
    started again after the backoff; none is while stopping.
    """

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from rproxy.workers.master import MasterService

        self.reactor = MemoryReactorClock()
        self.master = MasterService(parse_config(data(workers=2)), self.reactor)
        self.spawned: list[int] = []
        self.master._spawn = lambda slot: self.spawned.append(slot.slot)  # type: ignore[method-assign]

    def die(self, slot: int, lived: float) -> None:
        from twisted.internet.error import ProcessTerminated
        from twisted.python.failure import Failure

        worker = self.master.slots[slot]
        worker.started_at = self.reactor.seconds() - lived
        worker.process = object()
        self.master.worker_ended(worker, Failure(ProcessTerminated(signal=9)))

    def test_restarted_after_backoff(self) -> None:
        """Deaths in a row wait 0.5 s, then 1 s; the other slot is untouched."""
        self.die(0, lived=0.2)
        self.reactor.advance(0.49)
        self.assertEqual(self.spawned, [])
        self.reactor.advance(0.01)
        self.assertEqual(self.spawned, [0])
        self.die(0, lived=0.2)
        self.reactor.advance(0.99)
        self.assertEqual(self.spawned, [0])
        self.reactor.advance(0.01)
        self.assertEqual(self.spawned, [0, 0])
        self.assertEqual([s.restarts for s in self.master.slots], [2, 0])

    def test_no_restart_while_stopping(self) -> None:
        """A worker that ends while the master stops is not started again; its end is reported."""
        self.master.stopping = True
        ended = self.master.slots[1].ended
        self.die(1, lived=5)
        self.successResultOf(ended)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


def worker_metrics(connections: int, active: int, requests: int) -> str:
    """A worker's metrics text: a counter, a gauge and a histogram."""
    return f"""\
# HELP rproxy_frontend_connections_total Client connections accepted
# TYPE rproxy_frontend_connections_total counter
rproxy_frontend_connections_total{{frontend="h"}} {connections}.0
rproxy_frontend_connections_created{{frontend="h"}} 1.7e+09
# HELP rproxy_frontend_active_connections Open client connections
# TYPE rproxy_frontend_active_connections gauge
rproxy_frontend_active_connections{{frontend="h"}} {active}.0
# HELP rproxy_http_request_duration_seconds Time
# TYPE rproxy_http_request_duration_seconds histogram
rproxy_http_request_duration_seconds_bucket{{le="+Inf"}} {requests}.0
rproxy_http_request_duration_seconds_sum {requests / 4}
rproxy_http_request_duration_seconds_count {requests}.0
"""


SERVER = "127.0.0.1:9001"


def worker_answer(op: str, pid: int, connections: int, active: int, requests: int) -> dict[str, object]:
    """
    A worker's answer to C{op}: its report (metrics, /health, /stats) or
    its dashboard sample, with C{connections} taken by frontend web and
    server L{SERVER}, C{active} of them open, C{requests} answered and
    one connect failure.
    """
    from rproxy.http.frontend import DURATION_BUCKETS

    served = {"active_connections": active, "total_connections": connections, "connect_failures": 1}
    if op == "console":
        return {"op": "console", "pid": pid, "ready": [], "token_pools": [], "node": None, "tunnels": [],
                "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0", "address": None,
                               "backend": "web", "total": connections, "active": active, "connect_errors": 1,
                               "classes": [0, requests, 0, 0, 0, 0],
                               "durations": [requests] + [0] * (len(DURATION_BUCKETS) - 1)}],
                "backends": [{"name": "web", "waiting": active, "servers": [dict(served, name=SERVER)]}]}
    return {"op": "report", "pid": pid, "ready": [], "unusable": [],
            "metrics": worker_metrics(connections, active, requests),
            "health": {"status": "ok", "problems": [], "token_pools": {},
                       "frontends": [{"name": "web", "listening": True, "active_connections": active, "waiting": 0,
                                      "total_connections": connections}],
                       "backends": [{"name": "web", "waiting": active, "servers": [dict(served, name=SERVER)]}]},
            "stats": {"pools": [{"name": "web", "waiting": active, "backends": [
                dict(served, server_id=SERVER, bytes_in=10 * connections, bytes_out=20 * connections)]}]}}


class _Answering:
    """A worker's control channel that answers every request with C{answer(op)} (or fails, for None)."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def request(self, message: dict[str, object], timeout: float, clock: object) -> object:
        from twisted.internet import defer

        answer = self.answer(message["op"])  # type: ignore[operator]
        return defer.succeed(answer) if answer is not None else defer.fail(defer.TimeoutError())


class _Holding:
    """A worker's control channel whose answers the test gives, when it wants: C{asked} holds the requests."""

    def __init__(self) -> None:
        self.asked: list[object] = []

    def request(self, message: object, timeout: float, clock: object) -> object:
        from twisted.internet import defer

        d: defer.Deferred[object] = defer.Deferred()
        self.asked.append(d)
        return d


class MachineCountersTests(SynchronousTestCase):
    """
    The master's /metrics (L{rproxy.workers.admin.MergedMetrics}), its
    /health and /stats and its dashboard across a worker's death and
    restart: their counters never go back.
    """

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from rproxy.workers.master import MasterService

        self.reactor = MemoryReactorClock()
        self.master = MasterService(parse_config(data(workers=2)), self.reactor)
        self.master._spawn = lambda slot: None  # type: ignore[method-assign]
        self.figures: dict[int, tuple[int, int, int] | None] = {}
        # (the master's pools, as its start would build them)
        self.master.inner.pools["web"] = Pool(self.master.config.backends[0], self.reactor)

    def run_worker(self, slot: int, pid: int, connections: int, active: int, requests: int) -> None:
        worker = self.master.slots[slot]
        worker.process, worker.pid, worker.configured = object(), pid, True
        self.figures[slot] = (connections, active, requests)

        def answer(op: str) -> dict[str, object] | None:
            figures = self.figures[slot]
            return None if figures is None else worker_answer(op, pid, *figures)

        worker.channel = _Answering(answer)  # type: ignore[assignment]

    def kill(self, slot: int) -> None:
        from twisted.internet.error import ProcessTerminated
        from twisted.python.failure import Failure

        self.master.worker_ended(self.master.slots[slot], Failure(ProcessTerminated(signal=9)))

    def scrape(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families
        from twisted.internet import defer

        from rproxy.workers.admin import MergedMetrics

        status, _, body = self.successResultOf(defer.Deferred.fromCoroutine(MergedMetrics(self.master).answer()))
        self.assertEqual(status, 200)
        return {sample.name: sample.value for family in text_string_to_metric_families(body.decode("utf-8"))
                for sample in family.samples if sample.labels.get("frontend", "h") == "h"}

    def json_totals(self) -> dict[str, float]:
        """The machine's /health and /stats figures of frontend web and server L{SERVER}."""
        import json

        from twisted.internet import defer

        from rproxy.workers.admin import MergedHealth, MergedStats

        _, _, body = self.successResultOf(defer.Deferred.fromCoroutine(MergedHealth(self.master).answer()))
        health = json.loads(body)
        [frontend] = health["frontends"]
        [server] = [s for s in health["backends"][0]["servers"] if s["name"] == SERVER]
        _, _, body = self.successResultOf(defer.Deferred.fromCoroutine(MergedStats(self.master).answer()))
        [stats] = [s for s in json.loads(body)["pools"][0]["backends"] if s["server_id"] == SERVER]
        return {"frontend": frontend["total_connections"], "frontend_active": frontend["active_connections"],
                "server": server["total_connections"], "failures": server["connect_failures"],
                "server_active": server["active_connections"], "stats": stats["total_connections"],
                "stats_failures": stats["connect_failures"], "bytes_in": stats["bytes_in"],
                "bytes_out": stats["bytes_out"], "stats_active": stats["active_connections"]}

    def expected(self, connections: int, active: int, failures: int) -> dict[str, float]:
        return {"frontend": connections, "frontend_active": active, "server": connections, "failures": failures,
                "server_active": active, "stats": connections, "stats_failures": failures,
                "bytes_in": 10 * connections, "bytes_out": 20 * connections, "stats_active": active}

    def test_json_totals_kept_across_restart(self) -> None:
        """
        /health and /stats: a dead worker's connections, connect failures
        and bytes as last seen stay in the machine's; its open connections
        go; the new process adds to them.
        """
        self.run_worker(0, pid=100, connections=50, active=3, requests=40)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        self.assertEqual(self.json_totals(), self.expected(56, 4, 2))
        self.kill(0)
        self.assertEqual(self.json_totals(), self.expected(56, 1, 2))
        self.run_worker(0, pid=102, connections=2, active=2, requests=1)
        self.assertEqual(self.json_totals(), self.expected(58, 3, 3))
        self.kill(0)
        self.run_worker(0, pid=103, connections=0, active=0, requests=0)
        self.assertEqual(self.json_totals(), self.expected(58, 1, 4))

    def test_json_worker_that_does_not_answer(self) -> None:
        """/health and /stats count a worker that does not answer in time as it last did, without its gauges."""
        self.run_worker(0, pid=100, connections=50, active=3, requests=40)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        self.json_totals()
        self.figures[0] = None
        self.assertEqual(self.json_totals(), self.expected(56, 1, 2))

    def answered_then_died(self, page: type) -> bytes:
        """
        C{page} asked while worker 0 answers (60 connections, having shown
        50), then dies before worker 1 (6) answers: its body.
        """
        from twisted.internet import defer

        self.run_worker(0, pid=100, connections=50, active=3, requests=40)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        self.assertEqual((self.scrape()["rproxy_frontend_connections_total"], self.json_totals()["frontend"]), (56, 56))
        held = [_Holding(), _Holding()]
        for slot, channel in zip(self.master.slots, held, strict=True):
            slot.channel = channel  # type: ignore[assignment]
        answered = defer.Deferred.fromCoroutine(page(self.master).answer())
        held[0].asked[0].callback(worker_answer("report", 100, 60, 0, 50))
        self.kill(0)
        held[1].asked[0].callback(worker_answer("report", 101, 6, 1, 4))
        _, _, body = self.successResultOf(answered)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        return body

    def test_answer_then_death_counted_once_metrics(self) -> None:
        """
        /metrics, a worker that answers then dies before the others do:
        its answer is what it counted, carried once (not also merged as a
        running worker's), and the counters do not go back afterwards.
        """
        from rproxy.workers.admin import MergedMetrics

        body = self.answered_then_died(MergedMetrics)
        self.assertIn(b'rproxy_frontend_connections_total{frontend="h"} 66\n', body)
        self.assertEqual(self.scrape()["rproxy_frontend_connections_total"], 66)

    def test_answer_then_death_counted_once_json(self) -> None:
        """/health, a worker that answers then dies before the others do: as for /metrics."""
        import json

        from rproxy.workers.admin import MergedHealth

        health = json.loads(self.answered_then_died(MergedHealth))
        self.assertEqual(health["frontends"][0]["total_connections"], 66)
        self.assertEqual(health["problems"], ["worker 0: not running"])
        self.assertEqual(self.json_totals()["frontend"], 66)

    def test_dashboard_totals_kept_across_restart(self) -> None:
        """
        The dashboard (L{rproxy.workers.console.MachineConsole}): a dead
        worker's connections stay in its frontend's and server's totals,
        and a worker that does not answer counts as it last did.
        """
        import json

        from rproxy.workers.console import MachineConsole

        console = MachineConsole(self.master, self.reactor)

        def sample() -> tuple[int, int, int]:
            self.successResultOf(console.collect())
            snapshot = json.loads(console.snapshot_bytes())
            [frontend] = snapshot["frontends"]
            [server] = [s for s in snapshot["backends"][0]["servers"] if s["name"] == SERVER]
            return frontend["total_connections"], frontend["open_connections"], server["total_connections"]

        self.run_worker(0, pid=100, connections=50, active=3, requests=40)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        self.assertEqual(sample(), (56, 4, 56))
        self.kill(0)
        self.reactor.advance(1)
        self.assertEqual(sample(), (56, 1, 56))
        self.run_worker(0, pid=102, connections=2, active=2, requests=1)
        self.reactor.advance(1)
        self.assertEqual(sample(), (58, 3, 58))
        self.figures[1] = None
        self.reactor.advance(1)
        self.assertEqual(sample(), (58, 2, 58))

    def test_counters_kept_across_restart(self) -> None:
        """
        A worker killed and started again: its counters as last scraped
        stay in the machine's, its gauges go; the new process adds to them.
        """
        self.run_worker(0, pid=100, connections=50, active=3, requests=40)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        before = self.scrape()
        self.assertEqual((before["rproxy_frontend_connections_total"], before["rproxy_frontend_active_connections"],
                          before["rproxy_http_request_duration_seconds_count"]), (56, 4, 44))
        self.kill(0)
        dead = self.scrape()
        self.assertEqual((dead["rproxy_frontend_connections_total"], dead["rproxy_frontend_active_connections"],
                          dead["rproxy_http_request_duration_seconds_count"],
                          dead["rproxy_http_request_duration_seconds_sum"]), (56, 1, 44, 11))
        self.run_worker(0, pid=102, connections=2, active=2, requests=1)
        after = self.scrape()
        self.assertEqual((after["rproxy_frontend_connections_total"], after["rproxy_frontend_active_connections"],
                          after["rproxy_http_request_duration_seconds_bucket"]), (58, 3, 45))
        self.kill(0)
        self.run_worker(0, pid=103, connections=0, active=0, requests=0)
        self.assertEqual(self.scrape()["rproxy_frontend_connections_total"], 58)

    def test_worker_that_does_not_answer(self) -> None:
        """A worker that does not answer a scrape in time counts as it last did; its gauges are left out."""
        self.run_worker(0, pid=100, connections=50, active=3, requests=40)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        self.scrape()
        self.figures[0] = None
        slow = self.scrape()
        self.assertEqual((slow["rproxy_frontend_connections_total"], slow["rproxy_frontend_active_connections"]),
                         (56, 1))

    def test_late_answer_of_a_dead_process_ignored(self) -> None:
        """Figures from a process that has died (or been replaced) are not taken as the slot's."""
        self.run_worker(0, pid=100, connections=50, active=3, requests=40)
        self.run_worker(1, pid=101, connections=6, active=1, requests=4)
        self.scrape()
        self.kill(0)
        slot = self.master.slots[0]
        slot.saw(worker_answer("report", 100, 60, 0, 0))
        self.run_worker(0, pid=102, connections=1, active=0, requests=0)
        self.assertEqual(self.scrape()["rproxy_frontend_connections_total"], 56 + 1)
        self.assertEqual(self.json_totals()["frontend"], 56 + 1)
        slot.saw(worker_answer("report", 100, 60, 0, 0))
        self.kill(0)
        self.assertEqual(self.scrape()["rproxy_frontend_connections_total"], 56 + 1)
        self.assertEqual(self.json_totals()["frontend"], 56 + 1)


class MergeAgentsTests(SynchronousTestCase):
    def test_each_agent_once_as_its_worker_sees_it(self) -> None:
        """
        An agent of a worker as that worker describes it (not the remote
        copy another worker lists), another machine's agent once.
        """
        def agent(ident: str, node: str, streams: int | None) -> dict[str, object]:
            return {"id": ident, "node": node, "streams_opened": streams}

        reports = [
            {"node": "m-w0", "tunnels": [{"name": "gpu", "agents": [
                agent("a", "m-w0", 3), agent("b", "m-w1", None), agent("x", "other", None)]}]},
            {"node": "m-w1", "tunnels": [{"name": "gpu", "agents": [
                agent("a", "m-w0", None), agent("b", "m-w1", 5), agent("x", "other", None)]}]},
        ]
        self.assertEqual(merge_agents(reports), [{"name": "gpu", "agents": [
            agent("a", "m-w0", 3), agent("b", "m-w1", 5), agent("x", "other", None)]}])
        self.assertEqual(merge_agents(reports[1:]), [{"name": "gpu", "agents": [
            agent("a", "m-w0", None), agent("b", "m-w1", 5), agent("x", "other", None)]}])

    def test_dashboard_tunnels(self) -> None:
        """The dashboard's tunnel rows: the agents merged, the streams summed."""
        reports = [
            {"node": "m-w0", "tunnels": [{"name": "gpu", "mode": "tcp", "streams_opened": 2, "streams_failed": 1,
                                          "agents": [{"id": "a", "node": "m-w0"}, {"id": "b", "node": "m-w1"}]}]},
            {"node": "m-w1", "tunnels": [{"name": "gpu", "mode": "tcp", "streams_opened": 5, "streams_failed": 0,
                                          "agents": [{"id": "a", "node": "m-w0"}, {"id": "b", "node": "m-w1"}]}]},
        ]
        self.assertEqual(merge_tunnel_rows(reports), [{
            "name": "gpu", "mode": "tcp", "streams_opened": 7, "streams_failed": 1,
            "agents": [{"id": "a", "node": "m-w0"}, {"id": "b", "node": "m-w1"}]}])


class WorkerStartTests(SynchronousTestCase):
    """
    L{rproxy.workers.child.Worker} brought up as the master does it (the
    snapshot, then the configuration) on a memory reactor.
    """

    def setUp(self) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.testing import MemoryReactorClock

        from rproxy.workers import child

        self.patch(child, "_freeze", lambda: None)  # (no gc.freeze in the test process)
        self.reactor = MemoryReactorClock()
        self.config = parse_config(data(workers=2))
        self.worker = child.Worker(self.reactor, 1, 2)
        self.transport = StringTransport()
        self.worker.channel.makeConnection(self.transport)
        # the state of the server at the moment the frontend starts to serve
        self.at_listen: list[tuple[str, int]] = []

        def endpoint(frontend: object, backlog: int) -> TCP4ServerEndpoint:
            assert self.worker.service is not None
            server = self.worker.service.pools["web"].server("127.0.0.1:9002")
            assert server is not None
            self.at_listen.append((server.admin_state, server.weight))
            return TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")

        self.worker.endpoint = endpoint  # type: ignore[method-assign]

    def start(self, master: Pool) -> Pool:
        """
        The master's messages to a new worker (its snapshot, then its
        configuration); the worker's pool once it answered.
        """
        for message in snapshot({"web": master}, self.reactor.seconds()):
            self.worker.handle(message)
        self.worker.handle({"op": "configure", "id": 1, "config": pack_config(self.config)})
        self.assertIn(b'"op":"configured"', self.transport.value().replace(b" ", b""))
        assert self.worker.service is not None
        return self.worker.service.pools["web"]

    def assert_started_with(self, state: str) -> None:
        """
        A worker started (again) while server 9002 has C{state} and a
        weight set in the master takes both from the master's snapshot
        before its frontend serves, and never picks the server.
        """
        master = Pool(self.config.backends[0], Clock())
        master.set_admin("127.0.0.1:9002", state, 7)
        pool = self.start(master)
        self.assertEqual(self.at_listen, [(state, 7)])
        picked = {pool.pick().name for _ in range(6)}  # type: ignore[union-attr]
        self.assertEqual(picked, {"127.0.0.1:9001"})

    def test_maint_applied_before_serving(self) -> None:
        """A server in maintenance stays out of a restarted worker's picks."""
        self.assert_started_with("maint")

    def test_drain_applied_before_serving(self) -> None:
        """A drained server stays out of a restarted worker's picks."""
        self.assert_started_with("drain")

    def test_later_admin_change_applies_live(self) -> None:
        """After the start, the master's admin messages apply at once, back to ready too."""
        master = Pool(self.config.backends[0], Clock())
        master.set_admin("127.0.0.1:9002", "maint")
        pool = self.start(master)
        server = master.set_admin("127.0.0.1:9002", "ready")
        self.worker.handle(admin_message(master, server))
        picked = {pool.pick().name for _ in range(6)}  # type: ignore[union-attr]
        self.assertEqual(picked, {"127.0.0.1:9001", "127.0.0.1:9002"})



def _bad_tls(test: Any) -> dict[str, Any]:
    """
    L{data} with a frontend on an C{ssl:} listen string whose file holds
    no certificate (the configuration's own checks load C{tls:} files, not
    these: a renewal can break them after the check).
    """
    path = test.mktemp()
    with open(path, "w") as f:
        f.write("not a certificate\n")
    changed: dict[str, Any] = data(workers=2)
    changed["frontends"] = [{"name": "web", "listen": f"ssl:8443:privateKey={path}", "backend": "web"}]
    return changed


class CertificateRefusalTests(SynchronousTestCase):
    """
    A reload naming a certificate that cannot be loaded changes nothing in
    any process: a worker that refuses one replies so and keeps its
    configuration (the master's refusal: L{MasterCertificateTests}).
    """

    def test_named_certificates_checked(self) -> None:
        """Every pair a configuration names is loaded; the first that cannot be names itself."""
        from rproxy.service import check_certificates, named_certificates

        named = named_certificates(parse_config(_bad_tls(self)))
        self.assertEqual([what for what, _ in named], ["frontend web"])
        error = self.assertRaises(ValueError, check_certificates, named)
        self.assertIn("frontend web: cannot load its certificates", str(error))

    def test_worker_keeps_its_configuration(self) -> None:
        """A worker whose service refuses the reload replies with why and keeps what it runs."""
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.testing import MemoryReactorClock

        from rproxy.workers import child

        self.patch(child, "_freeze", lambda: None)
        reactor = MemoryReactorClock()
        worker = child.Worker(reactor, 1, 2)
        transport = StringTransport()
        worker.channel.makeConnection(transport)
        worker.endpoint = lambda frontend, backlog: TCP4ServerEndpoint(reactor, 0)  # type: ignore[method-assign]
        worker.handle({"op": "configure", "id": 1, "config": pack_config(parse_config(data(workers=2)))})
        assert worker.service is not None
        running = worker.service.config

        async def refuse(new: object) -> tuple[str, list[str]]:
            return "failed", ["frontend web: cannot load its certificates (x / x): bad"]

        worker.service.apply_reload = refuse  # type: ignore[method-assign, assignment]
        transport.clear()
        worker.handle({"op": "configure", "id": 2, "config": pack_config(parse_config(_bad_tls(self)))})
        self.assertIn(b"cannot load its certificates", transport.value())
        self.assertIs(worker.service.config, running)


class MasterCertificateTests(TestCase):
    async def test_master_refuses_before_any_change(self) -> None:
        """
        The master's reload with a certificate that cannot be loaded is
        failed before it changes anything (its own part has no frontends
        to load them: it used to say ok while every worker refused).
        """
        from twisted.internet import reactor

        from rproxy.workers.master import MasterService

        master = MasterService(parse_config(data(workers=2)), reactor)
        before = master.config
        outcome, problems = await master.apply_reload(parse_config(_bad_tls(self)))
        self.assertEqual(outcome, "failed")
        self.assertIn("frontend web: cannot load its certificates", problems[0])
        self.assertIs(master.config, before)
        self.assertEqual(master.listeners, {})
