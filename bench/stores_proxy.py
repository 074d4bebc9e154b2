"""
An rproxy process for bench/stores_bench.py: runs the service from a
config file (on rproxy's reactor, as twistd would) and, with --events N,
emits N events a second through the service's event sink (Redis Streams
or Kafka, as the config says; 100 ticks a second), as heartbeats and
request records would.  Writes the
sink's counters to --report on SIGTERM.

    python bench/stores_proxy.py CONFIG --events 10000 --report FILE
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rproxy.reactor import install  # noqa: E402

install()

from twisted.internet import reactor, task  # noqa: E402

from rproxy.config import load_config  # noqa: E402
from rproxy.events import HEARTBEATS  # noqa: E402
from rproxy.service import RProxyService  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--events", type=int, default=0)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    service = RProxyService(load_config(args.config), reactor)
    service.startService()
    per_tick = args.events // 100
    first: list[float] = []

    def tick() -> None:
        stores = service.stores
        sink = stores.events if stores is not None else None
        if sink is None or "up" not in (stores.redis_state, stores.kafka_state):  # type: ignore[union-attr]
            return
        now = reactor.seconds()
        if not first:
            first.append(now)
        for _ in range(per_tick):
            sink.emit(HEARTBEATS, {"agent_id": "bench", "at": now, "cpu": 1.0, "memory": 2.0, "disk": 3.0,
                                   "load": 0.5, "active_streams": 1})

    if per_tick:
        task.LoopingCall(tick).start(0.01)

    def report() -> None:
        sink = service.stores.events if service.stores is not None else None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(args.report, "w") as f:
            json.dump({"sent": sink.sent if sink else 0, "dropped": sink.dropped if sink else 0,
                       "buffered": (len(sink.buffer) + getattr(sink, "in_flight", 0)) if sink else 0,
                       "seconds": reactor.seconds() - first[0] if first else 0.0,
                       # the whole process, librdkafka's threads included
                       "cpu": usage.ru_utime + usage.ru_stime}, f)

    def stop(signum: int, frame: object) -> None:
        report()
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main()
