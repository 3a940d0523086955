"""Ctrl-C safety: real SIGINTs (os.kill) at random moments into a process that uses the cache.

The worker (tests/interrupt_worker.py) runs gets, puts that evict, deletes and the other calls in
a loop under Python's default SIGINT handler; a neighbour process reads and writes the same cache
meanwhile with a 1 s lock timeout. After each KeyboardInterrupt the worker checks that nothing
stayed held (another thread's call, a fresh descriptor's flock, the readers table's writer flag,
its own next calls); some interrupts are followed at once by ``close()`` and a reopen. At the end
this process reads every acknowledged put within the normal timeout, writes, and verifies.

Also a script, for the before/after figures in DEVELOPERS.md:
``python tests/test_interrupt.py py|ext ROUNDS [--unstick]`` prints the campaign's summary.
"""

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "interrupt_worker.py")
ROUNDS = 300  # per core: a few seconds each
sys.path.insert(0, HERE)


def _lines(stream: Any, out: "queue.Queue[str]") -> None:
    for line in stream:
        out.put(line)
    out.put("")


def campaign(path: str, env: Dict[str, str], rounds: int, seed: int, unstick: bool = False) -> Dict[str, Any]:
    """Run the worker and the neighbour, interrupt the worker ``rounds`` times; the summary."""
    rng = random.Random(seed)
    stop_file = path.rstrip("/") + ".stop"
    args = ["--unstick"] if unstick else []
    worker = subprocess.Popen([sys.executable, WORKER, "worker", path, str(seed), *args], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    neighbour = None
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_lines, args=(worker.stdout, lines), daemon=True).start()
    reports: List[Dict[str, Any]] = []
    lost = 0
    try:
        first = lines.get(timeout=60)
        assert "ready" in first, worker.stderr.read() if worker.poll() is not None else first
        neighbour = subprocess.Popen([sys.executable, WORKER, "neighbour", path, str(seed)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)  # the neighbour is at work before the first interrupt
        for i in range(rounds):
            command = "stop" if i == rounds - 1 else ("close" if rng.random() < 0.05 else "probe")
            worker.stdin.write(command + "\n")
            worker.stdin.flush()
            time.sleep(rng.uniform(0.001, 0.02))
            line = None
            for _again in range(4):
                os.kill(worker.pid, signal.SIGINT)
                try:
                    line = lines.get(timeout=8)  # a probe that waits on held locks takes about 2 s
                    break
                except queue.Empty:
                    # Python drops an exception raised inside a weakref callback or a finaliser
                    # ("Exception ignored in ..."): that KeyboardInterrupt never reached the worker.
                    lost += 1
            if line is None:
                os.kill(worker.pid, signal.SIGUSR1)  # its stacks, on stderr (faulthandler)
                time.sleep(1)
                worker.kill()
                raise AssertionError(f"the worker hung after {i} interrupts: {worker.stderr.read()}")
            assert line, f"the worker died: {worker.wait()} {worker.stderr.read()}"
            reports.append(json.loads(line))
        final = json.loads(lines.get(timeout=60))
        assert worker.wait(timeout=60) == 0, worker.stderr.read()
        open(stop_file, "w").close()
        out, err = neighbour.communicate(timeout=60)
        assert neighbour.returncode == 0, err
        near = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in (worker, neighbour):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if os.path.exists(stop_file):
            os.unlink(stop_file)
    stuck = [r for r in reports if "stuck" in r]
    return {
        "rounds": rounds,
        "inside_a_call": sum(r["inside"] for r in reports),
        "signals_lost_by_python": lost,
        "close_errors": [r[k] for r in reports for k in ("close", "reopen") if k in r],
        "stuck": len(stuck),
        "stuck_kinds": sorted({k for r in stuck for k in r["stuck"]}),
        "stuck_where": sorted({r["where"] for r in stuck}),
        "stuck_details": [r["stuck"] for r in stuck][:3],
        "unstuck_by_hand": sum(1 for r in stuck if r.get("after_unstick") == {}),
        "worker_errors": final["errors"],
        "worker_first_errors": final["first_errors"],
        "neighbour_ops": near["ops"],
        "neighbour_timeouts": near["timeouts"],
        "neighbour_errors": near["errors"],
        "keepers": final["keepers"],
    }


def test_sigint_at_random_points_leaves_the_cache_usable(Cache, cache_dir, core_env):
    from interrupt_worker import KEEPER, MAX_MB, record_for

    result = campaign(cache_dir, core_env, ROUNDS, seed=13)
    keepers = result.pop("keepers")
    summary = json.dumps(result, indent=1)
    # Most interrupts land inside a call (else the test proves little).
    assert result["inside_a_call"] >= ROUNDS // 2, summary
    assert result["stuck"] == 0, summary
    assert result["signals_lost_by_python"] <= ROUNDS // 20, summary
    assert result["close_errors"] == [], summary
    assert result["worker_errors"] == 0, summary
    assert result["neighbour_timeouts"] == 0 and result["neighbour_errors"] == [], summary
    assert result["neighbour_ops"] > 100, summary
    assert len(keepers) > 10, summary
    # Another process (this one), with the normal lock timeout: every acknowledged put is there,
    # a put works, and the cache has no damage.
    with Cache(cache_dir, MAX_MB) as cache:
        missing = [key for key in keepers if cache.get(key) != record_for(key, KEEPER)]
        assert missing == [], f"{len(missing)} of {len(keepers)} acknowledged puts lost"
        assert cache.put("sha256:after", b"z" * 1000)
        assert cache.get("sha256:after") == b"z" * 1000
        assert cache.verify() == []


if __name__ == "__main__":
    import shutil
    import tempfile

    which, rounds = sys.argv[1], int(sys.argv[2])
    env = dict(os.environ)
    env["NVCACHE_NO_EXTENSIONS"] = "1" if which == "py" else ""
    tmp = tempfile.mkdtemp(prefix="nvcache-sigint-")
    try:
        started = time.monotonic()
        result = campaign(os.path.join(tmp, "caches"), env, rounds, seed=int(os.environ.get("SEED", "13")),
                          unstick="--unstick" in sys.argv)
        result["keepers"] = len(result["keepers"])
        result["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
