"""
The C{rproxy} and C{rproxy-agent} commands: C{twistd -n --pidfile= rproxy
ARGS} (or C{rproxy-agent}), every argument after the command's name passed
to the plugin's options (C{--config FILE}, C{--help}).

They hand their service maker to twistd themselves instead of relying on
twistd's plugin discovery, which finds C{twisted/plugins/rproxy_plugins.py}
only in a directory on C{sys.path}: a plain install (site-packages) or a
compat editable install (the checkout on C{sys.path}), not a default
C{pip install -e .}, which maps packages through an import hook.

C{python -m rproxy.scripts --checkout DIR rproxy ARGS} is what C{bin/rproxy}
runs: a relative C{--config} that does not exist in the current directory
is taken from the checkout, so C{bin/rproxy --config etc/rproxy.yaml} works
from any directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

from twisted.application.service import ServiceMaker

__all__ = ["MAKERS", "checkout_config", "main", "rproxy", "rproxy_agent"]

# the twistd plugin (twisted/plugins/rproxy_plugins.py) exposes these same objects
MAKERS = {
    "rproxy": ServiceMaker(
        "rproxy", "rproxy.tap", "rproxy: TCP/HTTP load balancer, reverse tunnel and token-pool proxy", "rproxy"),
    "rproxy-agent": ServiceMaker(
        "rproxy-agent", "rproxy.tunnel.agenttap",
        "rproxy tunnel agent: exposes local services through an rproxy tunnel", "rproxy-agent"),
}

def checkout_config(args: list[str], checkout: str, default: str,
                    exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """
    C{args} with a relative configuration path that is missing from the
    current directory but present in C{checkout} made absolute (the
    C{default} one too, when no C{--config} is given).
    """

    def resolve(path: str) -> str:
        if os.path.isabs(path) or exists(path) or not exists(os.path.join(checkout, path)):
            return path
        return os.path.join(checkout, path)

    out: list[str] = []
    given = False
    items = iter(args)
    for arg in items:
        if arg == "--":
            out.append(arg)
            out.extend(items)
            break
        if arg in ("--config", "-c"):
            value = next(items, None)
            out.append(arg)
            if value is not None:
                out.append(resolve(value))
            given = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve(arg[len("--config="):]))
            given = True
        elif arg.startswith("-c") and not arg.startswith("--"):
            out.append("-c" + resolve(arg[2:]))
            given = True
        else:
            out.append(arg)
    if not given and resolve(default) != default:
        out[:0] = ["--config", resolve(default)]
    return out


def _run(command: str, args: list[str]) -> None:
    """
    Run twistd in the foreground without a pid file, with only C{command}'s
    service maker known to it.
    """
    from twisted.application import app
    from twisted.scripts import twistd

    maker = MAKERS[command]

    class Options(twistd.ServerOptions):  # type: ignore[misc]
        @property
        def subCommands(self) -> Iterator[tuple[str, None, Callable[[], object], str]]:
            self.loadedPlugins = {maker.tapname: maker}
            yield (maker.tapname, None, lambda: maker.options(), maker.description)

    sys.argv = [command, "-n", "--pidfile=", command, *args]
    app.run(twistd.runApp, Options)


def rproxy() -> None:
    """
    The C{rproxy} command.
    """
    _run("rproxy", sys.argv[1:])


def rproxy_agent() -> None:
    """
    The C{rproxy-agent} command.
    """
    _run("rproxy-agent", sys.argv[1:])


def main(argv: list[str]) -> None:
    """
    C{[--checkout DIR] COMMAND ARGS...}, for the scripts in C{bin/}.
    """
    checkout = None
    if argv[:1] == ["--checkout"]:
        checkout, argv = argv[1], argv[2:]
    if not argv or argv[0] not in MAKERS:
        raise SystemExit(f"usage: python -m rproxy.scripts [--checkout DIR] {{{','.join(MAKERS)}}} ARGS...")
    command, args = argv[0], argv[1:]
    if checkout is not None:
        # the plugin's default --config, relative to where it runs
        args = checkout_config(args, checkout, MAKERS[command].options()["config"])
    _run(command, args)


if __name__ == "__main__":
    main(sys.argv[1:])
