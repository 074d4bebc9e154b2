"""
rproxyctl: operator commands.

  rproxyctl check-config FILE      validate a configuration (rproxy's or an
                                   agent's) without starting
  rproxyctl reload [-c FILE] [PIDFILE|PID]
                                   validate FILE, then have the running rproxy
                                   re-read it (admin API, or SIGHUP to the pid)
                                   and report whether it applied it
  rproxyctl monitor [-c FILE] [--watch [SECONDS]]
                                   agents, servers and frontends; --watch
                                   redraws them like top until Ctrl-C
  rproxyctl server drain|maint|ready BACKEND/SERVER
  rproxyctl server weight BACKEND/SERVER N
                                   HAProxy's "set server", through the admin API
  rproxyctl migrate [-c FILE]      apply the PostgreSQL schema migrations
  rproxyctl cert [--name N] [--out DIR]
                                   write a self-signed development pair
                                   (cert.pem, key.pem) for tunnel TLS
  rproxyctl --version

Commands that talk to the admin port find it, and the admin key, in the
configuration file (C{-c}); C{--admin URL} and C{--key} (or
C{RPROXY_ADMIN_KEY}) override them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import rproxy
from rproxy.config import ConfigError, load_config
from rproxy.config.load import load_yaml, read_file


def _is_agent_file(path: str) -> bool:
    """
    Whether C{path} looks like an agent's configuration (server, services)
    rather than rproxy's (frontends, backends, tunnels, ...).  The file is
    read within the limits every config read keeps (L{load_yaml}: a deep
    or aliased document is refused, not a RecursionError).
    """
    try:
        data = load_yaml(read_file(path), path)
    except (OSError, ConfigError):
        return False  # load_config reports it
    if not isinstance(data, dict):
        return False
    proxy_keys = {"frontends", "backends", "tunnels", "token_pools", "admin", "global", "stores"}
    return bool({"services", "server", "models", "models_from"} & set(data)) and not proxy_keys & set(data)


def check_agent_config(path: str) -> int:
    from rproxy.tunnel.config import load_agent_config

    try:
        config = load_agent_config(path)
    except ConfigError as e:
        for line in e.lines(50):
            print(line, file=sys.stderr)
        print(f"{path}: invalid agent configuration ({len(e.errors)} problem{'s' if len(e.errors) != 1 else ''})",
              file=sys.stderr)
        return 1
    servers = ", ".join(f"{host}:{port}" for (host, port), _ in config.servers or ((config.control, config.proxy),))
    models = ", ".join(config.models) or (f"from {config.models_from}" if config.models_from else "none")
    print(f"{path}: ok (agent {config.agent_id or '(id kept in ' + config.state_dir + ')'} for {servers}, "
          f"{len(config.services)} service{'s' if len(config.services) != 1 else ''}: "
          f"{', '.join(s.name for s in config.services)}; models: {models})")
    return 0


def check_config(path: str) -> int:
    if _is_agent_file(path):
        return check_agent_config(path)
    try:
        config = load_config(path)
    except ConfigError as e:
        for line in e.lines(50):
            print(f"{line}", file=sys.stderr)
        print(f"{path}: invalid ({len(e.errors)} problem{'s' if len(e.errors) != 1 else ''})", file=sys.stderr)
        return 1
    print(
        f"{path}: ok ({len(config.frontends)} frontends, {len(config.backends)} backends, "
        f"{sum(len(b.servers) for b in config.backends)} servers)"
    )
    return 0


class Admin:
    """
    The running rproxy's admin port: its base URL and key.
    """

    def __init__(self, base: str, key: str | None) -> None:
        self.base = base.rstrip("/")
        self.key = key

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
        """
        (status, decoded JSON) of one request.

        @raise OSError: the admin port cannot be reached.
        """
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.load(e)
            except ValueError:
                return e.code, {"error": e.reason}
        except ValueError as e:
            raise OSError(f"not a JSON answer: {e}") from None


def _admin_url(config_path: str) -> tuple[str, str | None]:
    from rproxy.config import parse_endpoint

    config = load_config(config_path)
    endpoint = parse_endpoint(config.admin.listen or "tcp:18081")
    port = endpoint.port or 18081
    host = endpoint.interface
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}", config.admin.api_key


def _admin(args: argparse.Namespace) -> Admin:
    """
    The admin port from C{--admin}/C{--key} or the configuration file.

    @raise ConfigError: the file is needed and invalid.
    """
    key = args.key or os.environ.get("RPROXY_ADMIN_KEY")
    if args.admin:
        if key is None and os.path.exists(args.config):
            try:
                key = _admin_url(args.config)[1]
            except ConfigError:
                pass  # the URL is given: the file was only a place to look for the key
        return Admin(args.admin, key)
    base, configured = _admin_url(args.config)
    return Admin(base, key or configured)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{int(seconds)}s ago"
    if seconds < 7200:
        return f"{int(seconds // 60)}m ago"
    return f"{int(seconds // 3600)}h ago"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def monitor_lines(snapshot: dict[str, Any]) -> list[str]:
    """
    The monitor's text from a dashboard snapshot: agents (the VK gateway's
    table), then servers, then frontends.
    """
    # in a cluster, the node each agent is logged in to
    cluster = any("node" in a for t in snapshot.get("tunnels", []) for a in t.get("agents", []))
    node_header = f" {'Node':12}" if cluster else ""
    lines = [f"{'Tunnel':10} {'Agent ID':22}{node_header} {'CPU (%)':>8} {'Memory (%)':>11} {'Disk (%)':>9} "
             f"{'Streams':>8}  Last Heartbeat", "-" * 90]
    for tunnel in snapshot.get("tunnels", []):
        for agent in tunnel.get("agents", []):
            node = f" {str(agent.get('node') or '-')[:12]:12}" if cluster else ""
            lines.append(
                f"{tunnel['name'][:10]:10} {agent['id'][:22]:22}{node} {_pct(agent['cpu']):>8} "
                f"{_pct(agent['memory']):>11} {_pct(agent['disk']):>9} {agent['active_streams']:>8}  "
                f"{_ago(agent.get('last_heartbeat_ago'))}")
    lines += ["", f"{'Backend':12} {'Server':20} {'State':12} {'Weight':>6} {'Active':>7} {'Total':>9} "
                  f"{'Errors':>7}  Last check", "-" * 90]
    for backend in snapshot.get("backends", []):
        for server in backend["servers"]:
            check = server.get("last_check")
            last = "-" if check is None else ("ok" if check["ok"] else f"failed: {check['reason']}")
            lines.append(f"{backend['name'][:12]:12} {server['name'][:20]:20} {server['state']:12} "
                         f"{server['weight']:>6} {server['active_connections']:>7} {server['total_connections']:>9} "
                         f"{server['connect_failures']:>7}  {last}")
    frontends = snapshot.get("frontends", [])
    if frontends:
        lines += ["", f"{'Frontend':12} {'Proto':5} {'Req/s':>8} {'4xx':>6} {'5xx':>6} {'p50 ms':>8} {'p99 ms':>8} "
                      f"{'Open':>6}", "-" * 90]
        for f in frontends:
            now = f["now"]

            def ms(v: float | None) -> str:
                return "-" if v is None else f"{v:.1f}"

            lines.append(f"{f['name'][:12]:12} {f['protocol']:5} {now['requests_per_s']:>8.1f} "
                         f"{100 * now['error_rate']['4xx']:>5.1f}% {100 * now['error_rate']['5xx']:>5.1f}% "
                         f"{ms(now['p50_ms']):>8} {ms(now['p99_ms']):>8} {f['open_connections']:>6}")
    reload_ = snapshot.get("reload")
    if reload_:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reload_["at"]))
        lines += ["", f"last reload: {when} {reload_['result']}"
                      + (": " + "; ".join(reload_["errors"]) if reload_["errors"] else "")]
    return lines


def monitor(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep,
            out: Any = None, rounds: int | None = None) -> int:
    """
    Print the monitor once, or (C{--watch}) redraw it every few seconds
    until interrupted.
    """
    out = out or sys.stdout
    try:
        admin = _admin(args)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 1
    shown = 0
    try:
        while True:
            try:
                status, body = admin.call("GET", "/api/v1/dashboard", timeout=5)
            except OSError as e:
                text = [f"rproxyctl: cannot read {admin.base}/api/v1/dashboard: {e}"]
                status, body = 0, None
            else:
                text = (monitor_lines(body) if status == 200
                        else [f"rproxyctl: {admin.base}/api/v1/dashboard answered {status}: {body.get('error')}"])
            if args.watch is None:
                stream = out if status == 200 else sys.stderr
                print("\n".join(text), file=stream)
                return 0 if status == 200 else 1
            header = f"rproxy at {admin.base}  {time.strftime('%H:%M:%S')}  (every {args.watch:g}s, Ctrl-C quits)"
            out.write("\x1b[H\x1b[2J" + header + "\n\n" + "\n".join(text) + "\n")
            out.flush()
            shown += 1
            if rounds is not None and shown >= rounds:
                return 0
            sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def server_command(args: argparse.Namespace) -> int:
    """
    C{server drain|maint|ready B/S} and C{server weight B/S N}.
    """
    backend, sep, name = args.server.partition("/")
    if not sep or not backend or not name:
        print(f"rproxyctl: {args.server!r}: give the server as BACKEND/SERVER", file=sys.stderr)
        return 2
    if args.action == "weight":
        if args.weight is None:
            print("rproxyctl: server weight BACKEND/SERVER N: the weight is missing", file=sys.stderr)
            return 2
        change: dict[str, Any] = {"weight": args.weight}
    else:
        change = {"state": args.action}
    try:
        admin = _admin(args)
        status, body = admin.call("PATCH", f"/api/v1/servers/{_quote(backend)}/{_quote(name)}", change)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 1
    except OSError as e:
        print(f"rproxyctl: cannot reach the admin port: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"rproxyctl: {backend}/{name}: {body.get('error', status)}", file=sys.stderr)
        return 1
    print(f"{backend}/{name}: {body['state']}, weight {body['weight']}, {body['active_connections']} open")
    return 0


def _quote(part: str) -> str:
    import urllib.parse

    return urllib.parse.quote(part, safe="")


def _pid(target: str) -> int:
    if target.isdigit():
        return int(target)
    with open(target) as f:
        return int(f.read().strip())


def _report(last: dict[str, Any]) -> int:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
    verdict = {"ok": "applied", "partial": "applied in part", "invalid": "refused (invalid file)",
               "failed": "failed"}.get(last["result"], last["result"])
    print(f"reload #{last['count']} at {when}: {verdict}" + (f" ({last['path']})" if last.get("path") else ""))
    for error in last["errors"]:
        print(f"  {error}")
    return 0 if last["result"] == "ok" else 1


def reload(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    """
    Validate the file, then ask the running rproxy to reload it: through
    the admin API, or by SIGHUP when a pid (file) is given; report what
    the process says it did.
    """
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for line in e.lines(50):
            print(line, file=sys.stderr)
        print(f"{args.config}: invalid; the running rproxy was not asked to reload", file=sys.stderr)
        return 1
    print(f"{args.config}: valid ({len(config.frontends)} frontends, {len(config.backends)} backends)")
    admin = _admin(args)
    if args.target is None:
        try:
            status, body = admin.call("POST", "/api/v1/reload", timeout=60)
        except OSError as e:
            print(f"rproxyctl: cannot reach the admin port at {admin.base}: {e}; "
                  "give rproxy's pid or pid file to send it SIGHUP", file=sys.stderr)
            return 1
        if body.get("reload") is None or status in (401, 409):
            print(f"rproxyctl: {body.get('error', status)}", file=sys.stderr)
            return 1
        return _report(body["reload"])
    try:
        before = admin.call("GET", "/api/v1/reload", timeout=5)[1].get("reload")
    except OSError:
        before = False
    try:
        pid = _pid(args.target)
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        print(f"rproxyctl: cannot signal {args.target}: {e}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}")
    if before is False:
        print(f"rproxyctl: the admin port at {admin.base} does not answer: whether rproxy applied the file is "
              "in its log", file=sys.stderr)
        return 1
    count = before["count"] if before else 0
    for _ in range(300):
        sleep(0.1)
        try:
            last = admin.call("GET", "/api/v1/reload", timeout=5)[1].get("reload")
        except OSError:
            continue
        if last and last["count"] > count:
            return _report(last)
    print("rproxyctl: rproxy did not report the reload within 30 s; see its log", file=sys.stderr)
    return 1


def cert(name: str, out: str) -> int:
    """
    What the seed's create_cert.sh does: a self-signed pair for development.
    """
    import os

    from rproxy.tls import self_signed

    cert_pem, key_pem = self_signed(name)
    os.makedirs(out, exist_ok=True)
    cert_path, key_path = os.path.join(out, "cert.pem"), os.path.join(out, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    print(f"wrote {cert_path} and {key_path} (self-signed for {name!r}, 365 days); "
          f"agents trust it with tls: {{ca: {cert_path}, server_name: {name}}}")
    return 0


def migrate_command(config_path: str) -> int:
    """
    Apply the schema migrations to stores.postgres (DATABASE_URL wins).
    """
    import os

    from twisted.internet import defer, task

    dsn = os.environ.get("DATABASE_URL")
    if dsn is None:
        try:
            config = load_config(config_path)
        except ConfigError as e:
            print("\n".join(e.errors), file=sys.stderr)
            return 1
        dsn = config.stores.postgres_dsn if config.stores is not None else None
    if not dsn:
        print("rproxyctl: no database: set stores.postgres.dsn or DATABASE_URL", file=sys.stderr)
        return 1
    async def run(reactor: object) -> None:
        from rproxy.store.postgres import connection, migrate

        conn = connection(reactor)
        try:
            await conn.connect(dsn)
        except Exception as e:  # noqa: BLE001 - reported as one line
            print(f"rproxyctl: cannot connect to PostgreSQL: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            raise SystemExit(1) from None
        try:
            applied = await migrate(conn)
        finally:
            conn.close()
        print(f"applied migrations {', '.join(map(str, applied))}" if applied else "schema is up to date")

    # react() runs the reactor and exits the process: 0, or SystemExit's code
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="etc/rproxy.yaml", help="rproxy's configuration (admin port, key)")
    parser.add_argument("--admin", help="the admin port's URL (default: from the configuration)")
    parser.add_argument("--key", help="the admin key (default: RPROXY_ADMIN_KEY, or admin.api_key)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rproxyctl", description="rproxy operator commands")
    parser.add_argument("--version", action="version", version=f"rproxyctl (rproxy) {rproxy.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a configuration file (rproxy's or an agent's)")
    check.add_argument("file")
    rel = sub.add_parser("reload", help="validate the file, have rproxy reload it, report the result")
    rel.add_argument("target", nargs="?", help="pid or pid file to send SIGHUP (default: the admin API)")
    _admin_options(rel)
    mon = sub.add_parser("monitor", help="agents, servers and frontends; --watch redraws them")
    _admin_options(mon)
    mon.add_argument("-w", "--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                     help="redraw every SECONDS (2 if not given) until Ctrl-C")
    srv = sub.add_parser("server", help="set a server's state (drain, maint, ready) or weight")
    srv.add_argument("action", choices=["drain", "maint", "ready", "weight"])
    srv.add_argument("server", help="BACKEND/SERVER")
    srv.add_argument("weight", nargs="?", type=int, help="the weight (server weight only)")
    _admin_options(srv)
    mig = sub.add_parser("migrate", help="apply the PostgreSQL schema migrations")
    mig.add_argument("-c", "--config", default="etc/rproxy.yaml", help="rproxy's configuration (stores.postgres)")
    crt = sub.add_parser("cert", help="write a self-signed development certificate and key")
    crt.add_argument("--name", default="localhost", help="host name the agents will verify")
    crt.add_argument("--out", default=".", help="directory for cert.pem and key.pem")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "monitor":
        return monitor(args)
    if args.command == "server":
        return server_command(args)
    if args.command == "migrate":
        return migrate_command(args.config)
    if args.command == "cert":
        return cert(args.name, args.out)
    return reload(args)


if __name__ == "__main__":
    sys.exit(main())
