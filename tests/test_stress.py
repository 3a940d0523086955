"""Short form of the stress campaign: bench/stress.py with 16 processes, over both cores.

Each core gets two runs of the driver against a fresh cache directory: one
without kills, where the hits and misses of the workers must equal the
cache's counters exactly, and one with chaos (a supervisor SIGKILLs random
workers, inside reads and writes, and restarts them). Some workers run as
PID 1 in their own PID namespace where ``unshare`` is allowed. The long
form is the same driver, e.g.::

    .venv/bin/python bench/stress.py --workers 16 --duration 300 --chaos --json out.json

``NVCACHE_STRESS_SECONDS`` lengthens each short run here.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRESS = os.path.join(ROOT, "bench", "stress.py")
SECONDS = float(os.environ.get("NVCACHE_STRESS_SECONDS", "0") or 0)


def run_stress(tmp_path, core_env, core, *extra):
    out = tmp_path / "stress.json"
    core_name = "py" if core.__name__ == "nvcache.fallback" else "ext"
    cmd = [sys.executable, STRESS, "--workers", "16", "--core", core_name, "--path",
           str(tmp_path / "caches"), "--json", str(out), "--quiet", *extra]
    proc = subprocess.run(cmd, env=core_env, capture_output=True, text=True, timeout=240)
    assert out.exists(), f"driver wrote no JSON (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads(out.read_text())
    return proc, summary


def assert_healthy(proc, s):
    assert s["failures"] == [], s["failures"]
    assert s["crashes"] == 0 and s["hung"] == 0
    assert s["wrong_reads"] == 0
    assert s["worker_violations"] == 0 and s["sampler"]["violations"] == 0
    assert s["final"]["verify"] == []
    assert s["final"]["counters_ok"]
    assert s["final"]["readback_bad"] == 0
    assert s["sampler"]["max_record_total_size"] <= s["sampler"]["bound"]
    assert s["sampler"]["samples"] > 20 and s["sampler"]["dumps"] > 2
    assert s["passed"] and proc.returncode == 0, proc.stderr[-4000:]
    # The bound was actually reached, so eviction was exercised.
    assert s["sampler"]["max_record_total_size"] > s["sampler"]["bound"] * 0.8
    if s["processes"]["pidns_slots"]:
        assert s["processes"]["ran_as_pid1"] >= 1
    else:
        print("no PID-namespace workers:", s["processes"]["pidns_note"])


def test_stress_exact_counters(tmp_path, core_env, core):
    proc, s = run_stress(tmp_path, core_env, core, "--duration", str(SECONDS or 5), "--pidns", "4",
                         "--max-mb", "0.5", "--keys", "1500")
    assert_healthy(proc, s)
    assert s["kills"] == 0
    assert s["final"]["counter_rule"].endswith("(exact)")
    assert s["final"]["cache_hits"] == s["hits"] and s["final"]["cache_misses"] == s["misses"]
    assert s["hits"] > 0 and s["misses"] > 0
    assert s["ops"]["get"] > 1000 and s["ops"]["put"] > 300 and s["ops"]["delete"] > 0
    assert s["ops"]["stats"] > 0 and s["ops"]["cache_data"] > 0
    assert s["errors"] == {}


@pytest.mark.parametrize("policy", ["lru", "lrfu"])
def test_stress_chaos(tmp_path, core_env, core, policy):
    proc, s = run_stress(tmp_path, core_env, core, "--duration", str(SECONDS or 4.5), "--pidns", "4",
                         "--chaos", "--kill-every", "0.25", "--kill-margin", "0.5",
                         "--max-mb", "0.5", "--keys", "1500", "--policy", policy, "--mix",
                         "get=60,put=25,delete=4,contains=3,len=1,stats=4,cache_data=2,clear=1")
    assert_healthy(proc, s)
    assert s["kills"] >= 3 and s["restarts"] == s["kills"]
    assert s["processes"]["started"] == 16 + s["restarts"]
    # Killed workers release their locks with their lives: nobody timed out waiting.
    assert "CacheTimeout" not in s["errors"]
    assert s["ops"]["clear"] > 0
