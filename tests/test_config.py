"""
Tests for L{rproxy.config}.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError, load_config, parse_config, parse_duration, parse_size

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def minimal(**extra: object) -> dict[str, object]:
    data: dict[str, object] = {
        "backends": [{"name": "web", "servers": ["127.0.0.1:9001", {"address": "127.0.0.1:9002", "weight": 3}]}],
        "frontends": [{"name": "web", "listen": "tcp:8080", "backend": "web"}],
    }
    data.update(extra)
    return data


class ConfigErrorTests(SynchronousTestCase):
    def errors(self, data: object) -> list[str]:
        exc = self.assertRaises(ConfigError, parse_config, data)
        return exc.errors

    def test_port_out_of_range(self) -> None:
        """
        A listen port over 65535 is reported with the frontend's index.
        """
        data = minimal()
        data["frontends"] = [
            {"name": "a", "listen": "tcp:8080", "backend": "web"},
            {"name": "b", "listen": "tcp:70000", "backend": "web"},
        ]
        self.assertEqual(self.errors(data), ["frontends[1].listen: port 70000 out of range"])

    def test_host_port_out_of_range(self) -> None:
        """
        host:port addresses are checked too, for listeners and servers.
        """
        data = minimal()
        data["frontends"][0]["listen"] = "127.0.0.1:99999"  # type: ignore[index]
        data["backends"][0]["servers"][0] = "127.0.0.1:0"  # type: ignore[index]
        self.assertEqual(
            self.errors(data),
            [
                "backends[0].servers[0].address: port 0 out of range",
                "frontends[0].listen: port 99999 out of range",
            ],
        )

    def test_unknown_key_did_you_mean(self) -> None:
        """
        Unknown keys are errors, with the closest known key suggested.
        """
        data = minimal(globl={})
        data["frontends"][0]["bakend"] = "web"  # type: ignore[index]
        self.assertEqual(
            self.errors(data),
            [
                "frontends[0].bakend: unknown key (did you mean 'backend'?)",
                "globl: unknown key (did you mean 'global'?)",
            ],
        )

    def test_missing_backend(self) -> None:
        """
        A frontend naming a backend that does not exist is an error.
        """
        data = minimal()
        data["frontends"][0]["backend"] = "wbe"  # type: ignore[index]
        self.assertEqual(
            self.errors(data), ["frontends[0].backend: no backend named 'wbe' (did you mean 'web'?)"]
        )

    def test_bad_types_and_values(self) -> None:
        """
        Wrong types, unknown choices and bad durations name their key.
        """
        data = minimal(**{"global": {"connect_timeout": "5 parsecs", "backlog": "many"}})
        data["backends"][0]["algorithm"] = "round-robbin"  # type: ignore[index]
        data["backends"][0]["health_check"] = {"rise": 0}  # type: ignore[index]
        self.assertEqual(
            self.errors(data),
            [
                "global.backlog: expected an integer, got a string 'many'",
                "global.connect_timeout: invalid duration '5 parsecs' (use e.g. 250ms, 5s, 2m, 1h)",
                "backends[0].health_check.rise: 0 is below the minimum 1",
                "backends[0].algorithm: 'round-robbin' is not one of round-robin, weighted-round-robin,"
                " least-connections, random, p2c, ip-hash, hash (did you mean 'round-robin'?)",
            ],
        )

    def test_connect_timeout_above_zero(self) -> None:
        """
        A connect timeout of zero (or written 0ms) is refused with its key
        path, globally and per frontend: it failed every connect at once
        (every HTTP request a 502 counted against a healthy server).
        """
        data = minimal(**{"global": {"connect_timeout": 0}})
        data["frontends"][0]["connect_timeout"] = "0ms"  # type: ignore[index]
        self.assertEqual(self.errors(data), [
            "global.connect_timeout: expected a duration above zero, got 0",
            "frontends[0].connect_timeout: expected a duration above zero, got '0ms'",
        ])
        config = parse_config(minimal(**{"global": {"connect_timeout": "250ms"}}))
        self.assertEqual((config.global_.connect_timeout, config.frontends[0].connect_timeout), (0.25, 0.25))

    def test_duplicates(self) -> None:
        """
        Duplicate names of backends, frontends and servers are errors.
        """
        data = minimal()
        data["backends"].append({"name": "web", "servers": ["127.0.0.1:1"]})  # type: ignore[attr-defined]
        data["backends"][0]["servers"].append("127.0.0.1:9001")  # type: ignore[index]
        data["frontends"].append({"name": "web", "listen": "tcp:81", "backend": "web"})  # type: ignore[attr-defined]
        self.assertEqual(
            self.errors(data),
            [
                "backends[0].servers[2]: duplicate server name '127.0.0.1:9001'",
                "backends[1].name: duplicate backend name 'web'",
                "frontends[1].name: duplicate frontend name 'web'",
            ],
        )

    def test_not_a_mapping(self) -> None:
        """
        A document that is not a mapping is reported as such.
        """
        self.assertEqual(self.errors([1, 2]), ["config: expected a mapping, got a list"])
        self.assertEqual(
            self.errors({"frontends": {"name": "x"}}), ["frontends: expected a list, got a mapping"]
        )

    def test_token_pool_errors(self) -> None:
        """
        Token pools: key paths for a bad address, a refresh that is not
        before the ttl, a missing credential, a frontend naming an unknown
        pool (with a hint) and a tcp frontend asking for one.
        """
        data = minimal(token_pools=[
            {"name": "dolphin", "upstream": {"address": "127.0.0.1:99999"}, "ttl": "60s",
             "refresh_before": "90s", "credentials": [{"username": "u1", "password": "p1"}]},
            {"name": "empty", "upstream": {"address": "127.0.0.1:8848"}},
        ])
        data["frontends"] = [
            {"name": "web", "listen": "tcp:8080", "backend": "web", "protocol": "http", "token_pool": "dolphn"},
            {"name": "raw", "listen": "tcp:8081", "backend": "web", "token_pool": "dolphin"},
        ]
        self.assertEqual(
            self.errors(data),
            [
                "frontends[1].token_pool: token pools need protocol: http",
                "token_pools[0].upstream.address: port 99999 out of range",
                "token_pools[0].refresh_before: must be less than ttl (60s)",
                "token_pools[1].credentials: required (or credentials_file): at least one username and password",
                "frontends[0].token_pool: no token pool named 'dolphn' (did you mean 'dolphin'?)",
            ],
        )

    def test_timeouts_and_intervals_above_zero(self) -> None:
        """
        Every timeout, interval and delay whose zero makes no sense is
        refused with its key path: zero failed at once (a login timeout,
        a health or Redis timeout), spun (a login retry of 0s doubling to
        0s, a check every 0s), did nothing while saying it did (a 0s
        ejection), or was quietly replaced by the default (resync,
        retention, telemetry, cluster heartbeats).
        """
        data = minimal(
            stores={"postgres": {"dsn": "host=127.0.0.1", "resync_interval": 0, "heartbeat_retention": "0s"},
                    "redis": {"url": "redis://127.0.0.1:6379/0"}},
            telemetry={"otlp_endpoint": "http://127.0.0.1:4318", "timeout": 0, "schedule_delay": "0ms"},
            cluster={"node_id": "a", "advertise": {"proxy": "127.0.0.1:7000"},
                     "heartbeat_interval": 0, "heartbeat_timeout": 0},
            token_pools=[{"name": "p", "upstream": {"address": "127.0.0.1:8848"}, "ttl": 0,
                          "login_timeout": 0, "retry": {"initial": 0, "max": 0},
                          "credentials": [{"username": "u", "password": "p"}]}],
        )
        data["backends"][0].update({  # type: ignore[index]
            "health_check": {"interval": 0, "timeout": "0s"},
            "passive": {"ejection": 0},
        })
        data["frontends"][0].update({  # type: ignore[index]
            "protocol": "http", "rate_limit": [{"key": "ip", "rate": "10/s", "redis_timeout": 0}],
        })
        above = "expected a duration above zero, got"
        self.assertEqual(sorted(self.errors(data)), sorted([
            f"backends[0].health_check.interval: {above} 0",
            f"backends[0].health_check.timeout: {above} '0s'",
            f"backends[0].passive.ejection: {above} 0 (consecutive_failures: 0 turns passive ejection off)",
            f"frontends[0].rate_limit[0].redis_timeout: {above} 0",
            f"stores.postgres.resync_interval: {above} 0",
            f"stores.postgres.heartbeat_retention: {above} '0s'",
            f"telemetry.timeout: {above} 0",
            f"telemetry.schedule_delay: {above} '0ms'",
            f"cluster.heartbeat_interval: {above} 0",
            f"cluster.heartbeat_timeout: {above} 0",
            f"token_pools[0].ttl: {above} 0",
            f"token_pools[0].login_timeout: {above} 0",
            f"token_pools[0].retry.initial: {above} 0",
            f"token_pools[0].retry.max: {above} 0",
        ]))

    def test_zero_that_means_off(self) -> None:
        """
        The durations whose zero means none or at once stay valid: idle
        and HTTP timeouts (never), the grace period and queue waits (at
        once), slow start (none), a token refresh (at expiry).
        """
        data = minimal(**{"global": {"idle_timeout": 0, "grace_period": 0}})
        data["backends"][0].update({"queue_timeout": 0, "slow_start": 0})  # type: ignore[index]
        data["frontends"][0].update({"protocol": "http", "idle_timeout": 0, "queue_timeout": 0,  # type: ignore[index]
                                     "http": {"header_timeout": 0, "response_timeout": 0}})
        config = parse_config(data)
        frontend = config.frontends[0]
        self.assertEqual((config.global_.idle_timeout, config.global_.grace_period, frontend.idle_timeout,
                          frontend.http.header_timeout, frontend.http.response_timeout),
                         (0.0, 0.0, 0.0, 0.0, 0.0))

    def test_http_head_and_target_minimums(self) -> None:
        """
        http.max_head below 1 KiB and max_target below 1 byte are refused
        with their key paths, as max_headers 0 is: they answered every
        request 431 or 414.  The minimums themselves are valid.
        """
        data = minimal()
        data["frontends"] = [  # type: ignore[assignment]
            {"name": f"h{i}", "listen": f"tcp:{8080 + i}", "backend": "web", "protocol": "http", "http": http}
            for i, http in enumerate([{"max_head": 0, "max_target": 0}, {"max_head": 1}, {"max_head": "1023b"},
                                      {"max_headers": 0}])
        ]
        self.assertEqual(self.errors(data), [
            "frontends[0].http.max_target: 0 is below the minimum 1 byte",
            "frontends[0].http.max_head: 0 is below the minimum 1024 bytes",
            "frontends[1].http.max_head: 1 is below the minimum 1024 bytes",
            "frontends[2].http.max_head: '1023b' is below the minimum 1024 bytes",
            "frontends[3].http.max_headers: 0 is below the minimum 1",
        ])
        data["frontends"] = [  # type: ignore[assignment]
            {"name": "h", "listen": "tcp:8080", "backend": "web", "protocol": "http",
             "http": {"max_head": "1k", "max_target": 1}}]
        http = parse_config(data).frontends[0].http
        self.assertEqual((http.max_head, http.max_target), (1024, 1))

    def test_live_backend_needs_postgres(self) -> None:
        """
        source: postgres without stores.postgres is an error at its path;
        with it, the backend needs no servers.
        """
        data = minimal()
        data["backends"].append({"name": "live", "source": "postgres"})  # type: ignore[attr-defined]
        self.assertEqual(self.errors(data),
                         ["backends[1].source: postgres needs stores.postgres.dsn (or DATABASE_URL)"])
        data["stores"] = {"postgres": {"dsn": "host=127.0.0.1", "resync_interval": "5s"}}
        config = parse_config(data)
        self.assertEqual((config.backend("live").servers, config.stores.resync_interval), ((), 5.0))

    def test_tunnel_http_keys(self) -> None:
        """
        mode: http options are refused on a tcp tunnel; model routing needs
        mode: http; the body limit is bounded (64M), and defaults to 1 MiB,
        what chat requests with long prompts need.
        """
        data = minimal(tunnels=[
            {"name": "a", "strict_models": False, "algorithm": "model"},
            {"name": "b", "mode": "http", "model_body_limit": "65M", "control": "tcp:17100",
             "proxy": "tcp:17101", "public": "tcp:18100"},
        ])
        self.assertEqual(self.errors(data), [
            "tunnels[0].algorithm: model routing needs mode: http",
            "tunnels[0].strict_models: applies to mode: http only",
            "tunnels[1].model_body_limit: at most 64M (the bytes held before an agent is chosen)",
        ])
        data["tunnels"] = [data["tunnels"][1]]  # type: ignore[index]
        data["tunnels"][0]["model_body_limit"] = "4M"  # type: ignore[index]
        self.assertEqual(parse_config(data).tunnels[0].model_body_limit, 4 * 1024 * 1024)
        del data["tunnels"][0]["model_body_limit"]  # type: ignore[index]
        self.assertEqual(parse_config(data).tunnels[0].model_body_limit, 1024 * 1024)

    def test_token_pool_credentials_file(self) -> None:
        """
        credentials_file holds username:password lines (the password may
        hold colons); a bad line is reported with its number.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# pool accounts\nu1:p:1\n\nu2:p2\n")
        data = minimal(token_pools=[{"name": "d", "upstream": {"address": "127.0.0.1:8848"},
                                     "credentials_file": path, "sessions_per_credential": 3}])
        config = parse_config(data)
        pool = config.token_pools[0]
        self.assertEqual([(c.username, c.password) for c in pool.credentials], [("u1", "p:1"), ("u2", "p2")])
        self.assertEqual(pool.sessions_per_credential, 3)
        self.assertEqual((pool.login_path, pool.token_field, pool.ttl), ("/api/login", "result.0", 3600.0))
        self.assertNotIn("p2", repr(pool))
        with open(path, "a") as f:
            f.write("nocolon\n")
        self.assertEqual(self.errors(data), [f"token_pools[0].credentials_file: {path} line 5: expected username:password"])

    def test_invalid_yaml(self) -> None:
        """
        A YAML syntax error names the file and the line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("frontends:\n  - name: [unclosed\n")
        exc = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(len(exc.errors), 1)
        self.assertTrue(exc.errors[0].startswith(f"{path}: invalid YAML at line 3"), exc.errors[0])

    def test_missing_file(self) -> None:
        """
        A missing file is a config error, not a traceback.
        """
        exc = self.assertRaises(ConfigError, load_config, "/nonexistent/rproxy.yaml")
        self.assertEqual(exc.errors, ["/nonexistent/rproxy.yaml: cannot read: No such file or directory"])


class ConfigValueTests(SynchronousTestCase):
    def test_durations(self) -> None:
        """
        Durations accept ms, s, m, h and bare seconds.
        """
        self.assertEqual(
            [parse_duration(v) for v in ("250ms", "5s", "2m", "1h", 3, 1.5, "0.5s", "5")],
            [0.25, 5.0, 120.0, 3600.0, 3.0, 1.5, 0.5, 5.0],
        )
        for bad in ("-1s", "s", True, None, "1y"):
            self.assertRaises(ValueError, parse_duration, bad)

    def test_sizes(self) -> None:
        """
        Sizes accept k, M, G (binary multiples).
        """
        self.assertEqual([parse_size(v) for v in (512, "64k", "10M", "1G", "2MiB")],
                         [512, 65536, 10485760, 1073741824, 2097152])
        self.assertRaises(ValueError, parse_size, "ten")

    def test_defaults_and_normalisation(self) -> None:
        """
        host:port listeners become endpoint strings; defaults match HAProxy's.
        """
        config = parse_config(minimal())
        frontend = config.frontends[0]
        self.assertEqual(frontend.listen, "tcp:8080")
        self.assertEqual(parse_config(minimal(frontends=[
            {"name": "web", "listen": "127.0.0.1:0", "backend": "web"}])).frontends[0].listen,
            "tcp:0:interface=127.0.0.1")
        backend = config.backends[0]
        self.assertEqual(
            (backend.health_check.interval, backend.health_check.timeout,
             backend.health_check.rise, backend.health_check.fall),
            (2.0, 1.0, 2, 3),
        )
        self.assertEqual([s.weight for s in backend.servers], [1, 3])
        self.assertEqual(backend.servers[1].name, "127.0.0.1:9002")

    def test_shipped_example(self) -> None:
        """
        etc/rproxy.yaml is valid, and so are its commented HTTP and token
        pool examples once uncommented.
        """
        path = os.path.join(ROOT, "etc", "rproxy.yaml")
        config = load_config(path)
        self.assertEqual([f.name for f in config.frontends], ["web"])
        self.assertEqual([t.name for t in config.tunnels], ["gpu"])
        with open(path) as f:
            text = f.read()
        start, end = text.index("  # - name: web-http"), text.index("# Static API keys")
        block = "\n".join(  # (the tls line names files this test does not have)
            line.replace("  # ", "  ", 1).replace("# token_pool:", "token_pool:") if line.startswith("  # ") else line
            for line in text[start:end].splitlines()
            if "tls:" not in line
        )
        pools_at = text.index("# token_pools:")
        pools = "\n".join(line[2:] for line in text[pools_at:].splitlines())
        rest = text[end:pools_at] + pools
        uncommented = self.mktemp()
        with open(uncommented, "w") as f:
            f.write(text[:start] + block + "\n\n" + rest)
        config = load_config(uncommented)
        http = config.frontends[1]
        self.assertEqual((http.name, http.protocol, http.routes[0].host), ("web-http", "http", "api.example.com"))
        self.assertEqual(http.token_pool, "dolphin")
        [pool] = config.token_pools
        self.assertEqual((pool.name, pool.port, pool.token_field, pool.refresh_before), ("dolphin", 8848, "result.0", 300.0))


class PackagingTests(SynchronousTestCase):
    def test_every_package_is_shipped(self) -> None:
        """pyproject.toml lists every rproxy package, so pip install . ships them."""
        import tomllib

        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
        found = set()
        for directory, _, files in os.walk(os.path.join(ROOT, "rproxy")):
            if "__init__.py" in files:
                found.add(os.path.relpath(directory, ROOT).replace(os.sep, "."))
        self.assertEqual(found - listed, set())
