"""Real redis-server processes for the remote tier's tests and bench/remote.py.

Each server is the suite's own: a ``redis-server`` started from a config file in a temporary
directory (short, under /tmp: a unix socket path must stay under 108 bytes), bound to 127.0.0.1
on a free port and to a unix socket there, never persisting (no RDB, no AOF). The system's
service is never used or touched. ``RedisServer`` can stop (SIGSTOP), resume (SIGCONT), kill
and restart its process; ``RedisCluster3`` is three cluster-enabled masters joined by
``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes``. ``cleanup()`` (and an
atexit hook, for a run that dies between) kills every process started here and removes every
directory made here.

Without the binaries (``make test`` installs Debian's redis-server and redis-tools when root),
``require_binaries()`` skips with the reason.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

import redis

from nvcache import redislocal

_started: List["RedisServer"] = []
_dirs: List[str] = []


def require_binaries() -> None:
    """Skip the calling test (pytest.skip) unless redis-server and redis-cli are installed."""
    import pytest

    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: `make test` installs Debian's redis-server"
                    " and redis-tools when run as root (apt-get); install them to run these tests")


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's choice; the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_dir(prefix: str = "nvr-") -> str:
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    _dirs.append(path)
    return path


class RedisServer:
    """One redis-server process of the suite's own (see the module docstring)."""

    def __init__(self, password: Optional[str] = None, config: Optional[Dict[str, str]] = None,
                 cluster: bool = False) -> None:
        self.dir = make_dir()
        self.port = free_port()
        self.socket = os.path.join(self.dir, "redis.sock")
        self.password = password
        self.proc: Optional[subprocess.Popen] = None
        lines = {
            "bind": "127.0.0.1", "port": str(self.port), "unixsocket": self.socket,
            "unixsocketperm": "700", "dir": self.dir, "logfile": os.path.join(self.dir, "redis.log"),
            "daemonize": "no", "save": '""', "appendonly": "no", "databases": "4",
        }
        if password is not None:
            lines["requirepass"] = password
        if cluster:
            lines.update({"cluster-enabled": "yes", "cluster-config-file": os.path.join(self.dir, "nodes.conf"),
                          "cluster-node-timeout": "3000", "cluster-port": str(free_port())})
            if password is not None:
                lines["masterauth"] = password
        lines.update(config or {})
        self.conf = os.path.join(self.dir, "redis.conf")
        self._lines = lines
        self._write_conf()

    def _write_conf(self) -> None:
        with open(self.conf, "w") as f:
            f.writelines(f"{k} {v}\n" for k, v in self._lines.items())

    def _new_ports(self) -> None:
        """Other ports (free_port's port can be taken, e.g. as a client's ephemeral source port,
        before the server binds it): a fresh start that met "Address already in use" tries again."""
        self.port = free_port()
        self._lines["port"] = str(self.port)
        if "cluster-port" in self._lines:
            self._lines["cluster-port"] = str(free_port())
        self._write_conf()

    # -- addresses -----------------------------------------------------------------------
    @property
    def tcp_url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f"?password={self.password}" if self.password is not None else ""
        return f"unix://{self.socket}{auth}"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client on the unix socket, for a test to look at the server directly."""
        return redis.Redis(unix_socket_path=self.socket, password=self.password, socket_timeout=5, **kwargs)

    # -- the process ---------------------------------------------------------------------
    def start(self, timeout: float = 10.0, new_ports_on_conflict: bool = True) -> "RedisServer":
        def ping() -> bool:
            with self.client() as c:
                return bool(c.ping())
        for attempt in range(3):
            try:
                self.proc = redislocal.launch("redis-server", self.conf, self.dir, ping, timeout)
                break
            except RuntimeError as exc:
                if not new_ports_on_conflict or attempt == 2 or "Address already in use" not in str(exc):
                    raise
                self._new_ports()
        if self not in _started:
            _started.append(self)
        return self

    def log_tail(self) -> str:
        return redislocal.log_tail(self.dir)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap: connections are refused from now on (the socket file may stay)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies on SIGKILL too; be plain
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> "RedisServer":
        """Kill (if running) and start again on the same port and socket, empty (no persistence)."""
        self.kill()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        return self.start(new_ports_on_conflict=False)  # the same port and socket: clients reconnect

    def cleanup(self) -> None:
        self.kill()
        if self in _started:
            _started.remove(self)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir in _dirs:
            _dirs.remove(self.dir)


class RedisCluster3:
    """Three masters on loopback, no replicas, all 16384 slots covered."""

    def __init__(self, password: Optional[str] = None) -> None:
        self.password = password
        self.nodes = [RedisServer(password=password, cluster=True) for _ in range(3)]

    def start(self, timeout: float = 30.0) -> "RedisCluster3":
        for node in self.nodes:
            node.start()
        cmd = ["redis-cli"] + (["-a", self.password, "--no-auth-warning"] if self.password else [])
        cmd += ["--cluster", "create"] + [f"127.0.0.1:{n.port}" for n in self.nodes]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-1500:]!r} {done.stderr[-1500:]!r}")
        deadline = time.monotonic() + timeout
        while not all(self._ok(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        with node.client() as c:
            info = c.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
            return bool(info.get("cluster_state") == "ok")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}127.0.0.1:{self.nodes[0].port}"

    def owner(self, slot: int) -> RedisServer:
        """The master serving ``slot`` now (asked of the first node)."""
        with self.nodes[0].client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(slot)

    def move_slot(self, slot: int) -> RedisServer:
        """Give ``slot`` (holding no keys) to another master after the clients learned the map, so
        their next command on it meets MOVED; the new owner, once every node agrees."""
        old = self.owner(slot)
        new = next(n for n in self.nodes if n is not old)
        with old.client() as c:
            assert c.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        with new.client() as c:
            new_id = c.execute_command("CLUSTER MYID")
        for node in [new, old] + [n for n in self.nodes if n not in (new, old)]:
            with node.client() as c:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", new_id)
        deadline = time.monotonic() + 10
        while self.owner(slot) is not new and time.monotonic() < deadline:
            time.sleep(0.05)
        return new

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def cleanup() -> None:
    """Kill every server started here and remove every directory made here."""
    for server in list(_started):
        server.cleanup()
    for path in list(_dirs):
        shutil.rmtree(path, ignore_errors=True)
        _dirs.remove(path)


atexit.register(cleanup)
