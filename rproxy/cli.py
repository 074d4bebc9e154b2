"""
rproxyctl: operator commands.

  rproxyctl check-config FILE      validate a configuration without starting
  rproxyctl reload PIDFILE|PID     ask a running rproxy to re-read its file (SIGHUP)
  rproxyctl monitor [-c FILE]      print the tunnel agents table and exit
  rproxyctl migrate [-c FILE]      apply the PostgreSQL schema migrations
  rproxyctl cert [--name N] [--out DIR]
                                   write a self-signed development pair
                                   (cert.pem, key.pem) for tunnel TLS
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from rproxy.config import ConfigError, load_config


def check_config(path: str) -> int:
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


def reload(target: str) -> int:
    try:
        if target.isdigit():
            pid = int(target)
        else:
            with open(target) as f:
                pid = int(f.read().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        print(f"rproxyctl: cannot signal {target}: {e}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}")
    return 0


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


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{int(seconds)}s ago"
    if seconds < 7200:
        return f"{int(seconds // 60)}m ago"
    return f"{int(seconds // 3600)}h ago"


def monitor(config_path: str) -> int:
    import json
    import urllib.error
    import urllib.request

    try:
        base, key = _admin_url(config_path)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 1
    request = urllib.request.Request(base + "/api/v1/agents")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"rproxyctl: cannot read {base}/api/v1/agents: {e}", file=sys.stderr)
        return 1
    print(f"{'Tunnel':10} {'Agent ID':22} {'CPU (%)':>8} {'Memory (%)':>11} {'Disk (%)':>9} {'Streams':>8}  Last Heartbeat")
    print("-" * 90)

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for tunnel in body.get("tunnels", []):
        for agent in tunnel.get("agents", []):
            print(
                f"{tunnel['name'][:10]:10} {agent['id'][:22]:22} {pct(agent['cpu']):>8} {pct(agent['memory']):>11} "
                f"{pct(agent['disk']):>9} {agent['active_streams']:>8}  {_ago(agent['last_heartbeat_ago'])}"
            )
    return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rproxyctl", description="rproxy operator commands")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    rel = sub.add_parser("reload", help="send SIGHUP to a running rproxy")
    rel.add_argument("target", help="pid or pidfile (twistd writes twistd.pid)")
    mon = sub.add_parser("monitor", help="print the tunnel agents table")
    mon.add_argument("-c", "--config", default="etc/rproxy.yaml", help="rproxy's configuration (admin port, key)")
    mig = sub.add_parser("migrate", help="apply the PostgreSQL schema migrations")
    mig.add_argument("-c", "--config", default="etc/rproxy.yaml", help="rproxy's configuration (stores.postgres)")
    crt = sub.add_parser("cert", help="write a self-signed development certificate and key")
    crt.add_argument("--name", default="localhost", help="host name the agents will verify")
    crt.add_argument("--out", default=".", help="directory for cert.pem and key.pem")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "monitor":
        return monitor(args.config)
    if args.command == "migrate":
        return migrate_command(args.config)
    if args.command == "cert":
        return cert(args.name, args.out)
    return reload(args.target)


if __name__ == "__main__":
    sys.exit(main())
