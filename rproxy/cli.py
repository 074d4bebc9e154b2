"""
rproxyctl: operator commands.

  rproxyctl check-config FILE      validate a configuration without starting
  rproxyctl reload PIDFILE|PID     ask a running rproxy to re-read its file (SIGHUP)
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
        for line in e.errors:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rproxyctl", description="rproxy operator commands")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    rel = sub.add_parser("reload", help="send SIGHUP to a running rproxy")
    rel.add_argument("target", help="pid or pidfile (twistd writes twistd.pid)")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    return reload(args.target)


if __name__ == "__main__":
    sys.exit(main())
