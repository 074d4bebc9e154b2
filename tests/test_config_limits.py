"""
Tests for the config package's edges: documents that are empty, hostile
or huge, the one endpoint parser, pure validation, and the small contract
changes (access_log files, admin.api_key: null, the shipped example).
"""

from __future__ import annotations

import io
import os
import time
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from rproxy import cli
from rproxy.config import ConfigError, Sources, load_config, parse_config, parse_endpoint, validate
from rproxy.config.load import MAX_FILE
from rproxy.transport import TCPServerEndpoint, server_endpoint
from tests.test_config import ROOT, minimal


def alias_bomb(levels: int = 9) -> str:
    """
    The "billion laughs" document of repro/alias-bomb.sh: 9 levels of 9
    aliases, quoted where a wrong-typed value is reported.
    """
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    lines.append(f"global: {{max_connections: *l{levels - 1}}}")
    return "\n".join(lines) + "\n"


class DocumentLimitTests(SynchronousTestCase):
    def write(self, text: str | bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        return path

    def errors(self, text: str | bytes) -> list[str]:
        path = self.write(text)
        return [e.replace(path, "FILE") for e in self.assertRaises(ConfigError, load_config, path).errors]

    def test_empty_and_comment_only(self) -> None:
        """An empty or comment-only file is refused, saying so (it used to mean every default)."""
        message = ("FILE: holds no configuration (the file is empty or only comments); a configuration is a "
                   "mapping of sections (global, admin, backends, frontends, ...)")
        self.assertEqual(self.errors(""), [message])
        self.assertEqual(self.errors("# to be written\n\n"), [message])
        self.assertEqual(self.errors("---\n"), [message])

    def test_not_a_mapping(self) -> None:
        """A document that is a list or a scalar is refused with what it is."""
        self.assertEqual(self.errors("- a\n- b\n"),
                         ["FILE: expected a mapping of sections (global, admin, backends, frontends, ...), "
                          "got a list"])
        self.assertEqual(self.errors("frontends\n"),
                         ["FILE: expected a mapping of sections (global, admin, backends, frontends, ...), "
                          "got a string"])

    def test_empty_document_refused_by_parse_config(self) -> None:
        """parse_config(None) is refused too, not read as every default."""
        exc = self.assertRaises(ConfigError, parse_config, None)
        self.assertEqual(exc.errors, ["config: the document is empty: expected a mapping of sections "
                                      "(global, admin, backends, frontends, ...)"])

    def test_alias_bomb(self) -> None:
        """A billion-laughs document is refused while composed, in well under a second."""
        started = time.monotonic()
        errors = self.errors(alias_bomb())
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(errors, ["FILE: invalid YAML at line 6, column 5: more than 200000 values once aliases "
                                  "are expanded"])

    def test_too_many_aliases(self) -> None:
        """More than 1000 aliases are refused, whatever they expand to."""
        text = "a: &a x\nb: [" + ", ".join(["*a"] * 1001) + "]\n"
        [error] = self.errors(text)
        self.assertTrue(error.startswith("FILE: invalid YAML at line 2"), error)
        self.assertTrue(error.endswith(": more than 1000 aliases"), error)

    def test_deep_nesting(self) -> None:
        """30,000-deep nesting is a config error, not a RecursionError."""
        [error] = self.errors("global: " + "[" * 30000 + "]" * 30000 + "\n")
        self.assertTrue(error.startswith("FILE: invalid YAML at line 1"), error)
        self.assertTrue(error.endswith(": nested more than 64 deep"), error)

    def test_recursive_alias(self) -> None:
        """An alias inside the node it names (a cycle) is refused."""
        [error] = self.errors("a: &a [*a]\n")
        self.assertTrue(error.endswith(": an alias inside the node it refers to"), error)

    def test_file_too_large(self) -> None:
        """A file over 1 MiB is refused before it is parsed."""
        self.assertEqual(self.errors(b"#" * (MAX_FILE + 1)),
                         ["FILE: cannot read: larger than 1 MiB, the most rproxy reads"])

    def test_integer_too_long(self) -> None:
        """An integer of more digits than Python converts is a config error, not a ValueError."""
        [error] = self.errors("global: {max_connections: " + "9" * 5000 + "}\n")
        self.assertTrue(error.startswith("FILE: invalid YAML: Exceeds the limit"), error)

    def test_quoted_values_are_short(self) -> None:
        """A large wrong-typed value is quoted in 80 characters at most."""
        exc = self.assertRaises(ConfigError, parse_config, minimal(**{"global": {"max_connections": list(range(10**5))}}))
        self.assertEqual(exc.errors, ["global.max_connections: expected an integer, got a list [0, 1, 2, 3, ...]"])
        exc = self.assertRaises(ConfigError, parse_config, minimal(**{"global": {"grace_period": "x" * 10**6}}))
        [error] = exc.errors
        self.assertLess(len(error), 200)
        self.assertTrue(error.startswith("global.grace_period: invalid duration 'xxxx"), error)

    def test_error_lines_bounded(self) -> None:
        """ConfigError.lines() shows at most 25 lines, the last counting the rest."""
        data = minimal()
        data["backends"][0]["servers"] = ["nowhere"] * 100  # type: ignore[index]
        exc = self.assertRaises(ConfigError, parse_config, data)
        self.assertEqual(len(exc.errors), 100)
        lines = exc.lines()
        self.assertEqual(len(lines), 25)
        self.assertEqual(lines[-1], "... and 76 more problems")


class EndpointTests(SynchronousTestCase):
    def errors(self, data: object) -> list[str]:
        return self.assertRaises(ConfigError, parse_config, data).errors

    def test_misspelt_option(self) -> None:
        """tcp:8080:interfce=... is refused at its key path, with the options tcp takes."""
        data = minimal()
        data["frontends"][0]["listen"] = "tcp:8080:interfce=127.0.0.1"  # type: ignore[index]
        self.assertEqual(self.errors(data), [
            "frontends[0].listen: unknown option 'interfce' for tcp endpoints (did you mean 'interface'? "
            "tcp takes port, interface, backlog)"])

    def test_admin_and_tunnel_ports_checked(self) -> None:
        """The admin port and the three tunnel ports go through the same parser, at their key paths."""
        data = minimal(admin={"listen": "tcp:18081:backlog=0"},
                       tunnels=[{"name": "t", "control": "tcp6:17000:interface=::1:extra",
                                 "proxy": "unix:", "public": "ssl:18080:certkey=c.pem"}])
        self.assertEqual(self.errors(data), [
            "admin.listen: invalid backlog '0' (1 to 65535)",
            "tunnels[0].control: too many parts in 'tcp6:17000:interface=::1:extra' "
            "(tcp6 takes port, backlog, interface)",
            "tunnels[0].proxy: no path in 'unix:'",
            "tunnels[0].public: unknown option 'certkey' for ssl endpoints (did you mean 'certKey'? ssl takes "
            "port, privateKey, certKey, interface, backlog)",
        ])

    def test_listeners_sharing_a_socket(self) -> None:
        """Listeners that would take one socket (admin, frontends, tunnel ports) are refused at the later key path."""
        data = minimal(admin={"listen": "tcp:17000:interface=127.0.0.1"},
                       tunnels=[{"name": "t"}, {"name": "u", "control": "tcp:17100", "proxy": "tcp:17101",
                                                "public": "127.0.0.1:8080"}])
        data["frontends"].append({"name": "other", "listen": "unix:/run/a.sock", "backend": "web"})  # type: ignore[attr-defined]
        data["frontends"].append({"name": "more", "listen": "unix:/run/a.sock:mode=600", "backend": "web"})  # type: ignore[attr-defined]
        self.assertEqual(self.errors(data), [
            "frontends[2].listen: 'unix:/run/a.sock:mode=600' is already used by frontends[1].listen",
            "tunnels[0].control: 'tcp:17000' is already used by admin.listen",
            "tunnels[1].public: 'tcp:8080:interface=127.0.0.1' is already used by frontends[0].listen",
        ])
        data = minimal(frontends=[{"name": "a", "listen": "127.0.0.1:8080", "backend": "web"},
                                  {"name": "b", "listen": "127.0.0.2:8080", "backend": "web"},
                                  {"name": "c", "listen": "127.0.0.1:0", "backend": "web"},
                                  {"name": "d", "listen": "tcp:0", "backend": "web"}])
        self.assertEqual(len(parse_config(data).frontends), 4)

    def test_accepted_forms(self) -> None:
        """Each type's own options are accepted, escapes included."""
        for text in ("tcp:8080", "tcp:port=8080:interface=127.0.0.1:backlog=5", "tcp6:8080:interface=\\:\\:1",
                     "ssl:8443:privateKey=k.pem:certKey=c.pem", "unix:/run/rproxy.sock:mode=660",
                     "systemd:domain=INET:index=0", "systemd:INET:name=web"):
            self.assertEqual(parse_endpoint(text).description, text)
        self.assertEqual(parse_endpoint("tcp6:8080:interface=\\:\\:1").interface, "::1")

    def test_server_endpoint_uses_the_parse(self) -> None:
        """The service's endpoints come from the same parse: options honoured, bad strings refused."""
        endpoint = server_endpoint(object(), "tcp:0:interface=127.0.0.1:backlog=7", 511)
        self.assertIsInstance(endpoint, TCPServerEndpoint)
        self.assertEqual((endpoint._port, endpoint._interface, endpoint._backlog), (0, "127.0.0.1", 7))
        self.assertRaises(ValueError, server_endpoint, object(), "tcp:8080:interfce=127.0.0.1")

    def test_check_config_names_bad_endpoint(self) -> None:
        """rproxyctl check-config refuses a misspelt endpoint option, naming its key path."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('backends: [{name: w, servers: ["127.0.0.1:1"]}]\n'
                    'frontends: [{name: web, listen: "tcp:8080:interfce=127.0.0.1", backend: w}]\n')
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(cli.check_config(path), 1)
        self.assertIn("frontends[0].listen: unknown option 'interfce' for tcp endpoints", err.getvalue())


class PureValidationTests(SynchronousTestCase):
    def test_files_come_from_sources(self) -> None:
        """validate() reads no file: a credentials file is what Sources holds for its path."""
        data = minimal(token_pools=[{"name": "d", "upstream": {"address": "127.0.0.1:8848"},
                                     "credentials_file": "/nonexistent/creds"}])
        config = validate(data, Sources(files={"/nonexistent/creds": b"u1:p1\n"}))
        self.assertEqual([c.username for c in config.token_pools[0].credentials], ["u1"])
        exc = self.assertRaises(ConfigError, validate, data, Sources(files={"/nonexistent/creds": "Permission denied"}))
        self.assertEqual(exc.errors, ["token_pools[0].credentials_file: cannot read '/nonexistent/creds': "
                                      "Permission denied"])

    def test_environment_comes_from_sources(self) -> None:
        """validate() reads no environment variable: DATABASE_URL is what Sources holds."""
        self.patch(os, "environ", dict(os.environ, DATABASE_URL="host=elsewhere"))
        self.assertIsNone(validate(minimal(), Sources()).stores)
        config = validate(minimal(), Sources(environ={"DATABASE_URL": "host=db"}))
        self.assertEqual(config.stores.postgres_dsn, "host=db")  # type: ignore[union-attr]
        self.assertEqual(parse_config(minimal()).stores.postgres_dsn, "host=elsewhere")  # type: ignore[union-attr]

    def test_certificates_loaded_after(self) -> None:
        """A missing certificate names its key; one that does not load is reported once the rest is valid."""
        data = minimal()
        data["frontends"][0]["tls"] = {"cert": "/nonexistent/c.pem", "key": "/nonexistent/k.pem"}  # type: ignore[index]
        exc = self.assertRaises(ConfigError, parse_config, data)
        self.assertEqual(exc.errors, [
            "frontends[0].tls.cert: cannot read '/nonexistent/c.pem': No such file or directory",
            "frontends[0].tls.key: cannot read '/nonexistent/k.pem': No such file or directory",
        ])
        junk = self.mktemp()
        with open(junk, "w") as f:
            f.write("not a certificate\n")
        data["frontends"][0]["tls"] = {"cert": junk, "key": junk}  # type: ignore[index]
        [error] = self.assertRaises(ConfigError, parse_config, data).errors
        self.assertTrue(error.startswith(f"frontends[0].tls: cannot load {junk} / {junk}: "), error)


class ContractTests(SynchronousTestCase):
    def test_access_log_file(self) -> None:
        """access_log takes a format, or {format, path}: the file the HTTP frontend writes."""
        def frontend(access_log: object) -> dict[str, object]:
            return {"name": "web", "listen": "tcp:8080", "backend": "web", "protocol": "http",
                    "http": {"access_log": access_log}}

        config = parse_config(minimal(frontends=[frontend({"format": "json", "path": "/var/log/rproxy/access.log"})]))
        [web] = config.frontends
        self.assertEqual((web.access_log, web.access_log_path), ("json", "/var/log/rproxy/access.log"))
        self.assertEqual((web.http.access_log, web.http.access_log_path), ("json", "/var/log/rproxy/access.log"))
        [web] = parse_config(minimal(frontends=[frontend("combined")])).frontends
        self.assertEqual((web.access_log, web.access_log_path), ("combined", None))
        exc = self.assertRaises(ConfigError, parse_config, minimal(frontends=[frontend({"format": "jsn", "pth": "x"})]))
        self.assertEqual(exc.errors, [
            "frontends[0].http.access_log.format: 'jsn' is not one of off, combined, json (did you mean 'json'?)",
            "frontends[0].http.access_log.pth: unknown key (did you mean 'path'?)",
        ])
        exc = self.assertRaises(ConfigError, parse_config, minimal(frontends=[frontend({"path": "a.log"})]))
        self.assertEqual(exc.errors, ["frontends[0].http.access_log.path: the access log is off (format: off); "
                                      "set format: combined or json"])

    def test_admin_api_key_null(self) -> None:
        """admin.api_key: null opens the API (None), as etc/rproxy.yaml says; an empty key is refused."""
        self.assertIsNone(parse_config(minimal(admin={"api_key": None})).admin.api_key)
        self.assertEqual(parse_config(minimal(admin={"api_key": "k"})).admin.api_key, "k")
        exc = self.assertRaises(ConfigError, parse_config, minimal(admin={"api_key": ""}))
        self.assertEqual(exc.errors, ["admin.api_key: expected a non-empty string, got a string ''"])

    def test_web_http_example_passes_check_config(self) -> None:
        """etc/rproxy.yaml's commented web-http frontend, uncommented as is, passes check-config."""
        with open(os.path.join(ROOT, "etc", "rproxy.yaml")) as f:
            text = f.read()
        start, end = text.index("  # - name: web-http"), text.index("\n\n", text.index("  # - name: web-http"))
        block = "\n".join(line.replace("  # ", "  ", 1) for line in text[start:end].splitlines())
        self.assertIn("  - name: web-http", block)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text[:start] + block + text[end:])
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.check_config(path)
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertIn("ok (2 frontends", out.getvalue())
        self.assertEqual(load_config(path).frontends[1].protocol, "http")




class LineEndTests(SynchronousTestCase):
    """
    Names, header names and model names are checked to their very end: a
    trailing newline (which a C{$} anchor lets through) is refused.
    """

    def test_trailing_newline_refused(self) -> None:
        """A frontend name, a header rule's name and an agent's model ending in a newline are errors."""
        data = {
            "backends": [{"name": "web", "servers": ["127.0.0.1:1"]}],
            "frontends": [{"name": "web\n", "listen": "127.0.0.1:0", "backend": "web", "protocol": "http",
                           "routes": [{"backend": "web", "set_headers": {"X-A\n": "1"}}]}],
        }
        errors = self.assertRaises(ConfigError, parse_config, data).errors
        self.assertIn("frontends[0].name: 'web\\n' may only hold letters, digits, '_', '.' and '-'", errors)
        self.assertIn("frontends[0].routes[0].set_headers: invalid header name 'X-A\\n'", errors)
        from rproxy.tunnel.config import parse_agent_config

        agent = {"server": {"control": "127.0.0.1:1", "proxy": "127.0.0.1:2"}, "api_key": "k",
                 "local": "127.0.0.1:3", "models": ["llama\n"]}
        errors = self.assertRaises(ConfigError, parse_agent_config, agent).errors
        self.assertIn("models[0]: 'llama\\n' is not a model name (printable ASCII, no spaces)", errors)


class TunnelZeroDurationTests(SynchronousTestCase):
    """
    A tunnel's and an agent's timeouts and intervals that cannot work at
    zero are refused with their key path.
    """

    def test_tunnel_timeouts_above_zero(self) -> None:
        """heartbeat_timeout 0 would drop every agent, open_timeout 0 fail every stream."""
        data = {"api_keys": [{"key": "k"}],
                "tunnels": [{"name": "t", "control": "127.0.0.1:0", "proxy": "127.0.0.1:0", "public": "127.0.0.1:0",
                             "heartbeat_timeout": 0, "open_timeout": "0s"}]}
        errors = self.assertRaises(ConfigError, parse_config, data).errors
        self.assertIn("tunnels[0].heartbeat_timeout: expected a duration above zero, got 0", errors)
        self.assertIn("tunnels[0].open_timeout: expected a duration above zero, got '0s'", errors)

    def test_agent_durations_above_zero(self) -> None:
        """An agent's heartbeat loop, reconnect backoff and local connects need a time above zero."""
        from rproxy.tunnel.config import parse_agent_config

        agent = {"server": {"control": "127.0.0.1:1", "proxy": "127.0.0.1:2"}, "api_key": "k",
                 "local": "127.0.0.1:3", "heartbeat_interval": 0, "connect_timeout": 0,
                 "reconnect": {"initial": 0, "max": "0s"}}
        errors = self.assertRaises(ConfigError, parse_agent_config, agent).errors
        for key, got in (("heartbeat_interval", "0"), ("connect_timeout", "0"), ("reconnect.initial", "0"),
                         ("reconnect.max", "'0s'")):
            self.assertIn(f"{key}: expected a duration above zero, got {got}", errors)
