"""A private redis-server for a run that needs a remote tier and was given none (``nvcache simulate
--nodes N``): started from a config file in a directory of the run's own, listening only on a unix
socket there (``port 0``: no TCP port, so nothing else on the machine talks to it), never
persisting (``save ""``, ``appendonly no``), bounded by ``maxmemory`` with ``allkeys-lru`` (the
policy a remote tier wants: a full server evicts the least recently used records rather than
refusing writes). The system's service is never used or touched; ``stop()`` kills the process and
removes the socket. The suite's own servers (tests/redisservers.py) are the same idea with more
controls (TCP, AUTH, clusters, SIGSTOP).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Callable, Dict, Optional

BINARY = "redis-server"


def available() -> Optional[str]:
    """The redis-server binary's path, or None when it is not installed."""
    return shutil.which(BINARY)


def log_tail(directory: str) -> str:
    """The end of the server's log in ``directory``, for an error message."""
    try:
        with open(os.path.join(directory, "redis.log"), "rb") as f:
            return f.read()[-1500:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def launch(binary: str, conf: str, directory: str, ping: Callable[[], bool], timeout: float) -> subprocess.Popen:
    """Start ``binary conf`` in ``directory`` and return its process once ``ping()`` is true;
    RuntimeError (the process killed) when it exits or does not answer within ``timeout``. Also
    tests/redisservers.py's way of starting the suite's servers."""
    import redis

    with open(os.path.join(directory, "stdout.log"), "ab") as log:
        proc = subprocess.Popen([binary, conf], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=directory)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {log_tail(directory)}")
        try:
            if ping():
                return proc
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError(f"redis-server did not answer within {timeout} s: {log_tail(directory)}")
        time.sleep(0.02)


class PrivateRedis:
    """One redis-server of this process's own, on ``<directory>/redis.sock``."""

    def __init__(self, directory: str, maxmemory_mb: float = 64.0, config: Optional[Dict[str, str]] = None) -> None:
        if not maxmemory_mb > 0:
            raise ValueError(f"maxmemory_mb must be positive, got {maxmemory_mb!r}")
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.socket = os.path.join(directory, "redis.sock")
        if len(self.socket.encode()) > 100:  # sun_path holds 108 bytes with its NUL
            raise ValueError(f"socket path too long for a unix socket: {self.socket}")
        self.proc: Optional[subprocess.Popen] = None
        settings = {
            "port": "0", "unixsocket": self.socket, "unixsocketperm": "700", "dir": directory,
            "logfile": os.path.join(directory, "redis.log"), "daemonize": "no", "save": '""',
            "appendonly": "no", "maxmemory": str(int(maxmemory_mb * 2**20)),
            "maxmemory-policy": "allkeys-lru",
        }
        settings.update(config or {})
        self.conf = os.path.join(directory, "redis.conf")
        with open(self.conf, "w") as f:
            f.writelines(f"{k} {v}\n" for k, v in settings.items())

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> "PrivateRedis":
        """Start the server and return once it answers PING (RuntimeError if it exits or does not)."""
        import redis  # the remote extra: only a run with a remote tier needs it

        binary = available()
        if binary is None:
            raise RuntimeError(f"{BINARY} is not installed")

        def ping() -> bool:
            with redis.Redis(unix_socket_path=self.socket, socket_timeout=1) as client:
                return bool(client.ping())
        self.proc = launch(binary, self.conf, self.dir, ping, timeout)
        return self

    def log_tail(self) -> str:
        return log_tail(self.dir)

    def stop(self) -> None:
        """Kill the server (nothing to save: it never persists) and remove its socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
