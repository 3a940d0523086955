"""Trace files (nvcache/trace.py), their replay through real caches (nvcache/replay.py), and the
commands: ``nvcache replay TRACE`` and ``nvcache simulate --trace-out FILE --policy NAME``.

The replay's figures are checked against exact models of LRU: a trace whose scans are one layer
each (the keep rule then changes nothing) against ``simulate.lru_byte_hits``, and a trace of
multi-layer scans against a small LRU with the keep rule written here.
"""

import io
import json
import random
from collections import OrderedDict
from typing import List, Sequence, Set, Tuple

import pytest
from click.testing import CliRunner, Result

from nvcache import replay as rp
from nvcache import simulate as sim
from nvcache import trace as tr
from nvcache.cli import cli

KIB = 1024


def run(args: List[str]) -> Result:
    result = CliRunner().invoke(cli, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- the format ---------------------------------------------------------------------------
def test_round_trip(tmp_path):
    requests = [tr.Request(0.0, "sha256:" + "a" * 64, 1, "registry.example/app:1.2"),
                tr.Request(0.000412, "sha256:" + "b" * 64, 8120, "registry.example/app:1.2"),
                tr.Request(12.123456789, "L3", 512 * KIB, "img@sha256:" + "c" * 64),
                tr.Request(86400.5, "L3", 7, "x")]
    path = tmp_path / "t.trace"
    assert tr.write_trace(str(path), requests, ["a comment", "two\nlines"]) == 4
    assert list(tr.read_trace(str(path))) == requests
    lines = path.read_text().splitlines()
    assert lines[:4] == [tr.HEADER, "# a comment", "# two", "# lines"]
    assert lines[4:6] == [f"0.0 sha256:{'a' * 64} 1 registry.example/app:1.2",
                          f"0.000412 sha256:{'b' * 64} 8120 registry.example/app:1.2"]
    buf = io.StringIO()  # file objects too
    tr.write_trace(buf, requests)
    assert list(tr.read_trace(io.StringIO(buf.getvalue()))) == requests


def test_comments_blank_lines_and_line_ends_are_ignored():
    text = "# header\n\n   \n  # indented comment\n1 a 10 img\r\n2.5 b 20 img\n1e-3 c 30 other"
    assert list(tr.read_trace(io.StringIO(text))) == [
        tr.Request(1.0, "a", 10, "img"), tr.Request(2.5, "b", 20, "img"), tr.Request(0.001, "c", 30, "other")]


@pytest.mark.parametrize("line, problem", [
    ("0 a 10", "3 fields instead of 4"),
    ("0 a 10 img extra", "5 fields instead of 4"),
    ("0  a 10 img", "separated by single spaces"),
    ("0 a\t10 img", "separated by single spaces"),
    ("0 a 10 img ", "separated by single spaces"),
    ("x a 10 img", "time 'x' is not a number"),
    ("nan a 10 img", "time 'nan' is not finite"),
    ("0 a 0 img", "size '0' is not an integer from 1 to 1099511627776"),
    ("0 a -5 img", "size '-5' is not an integer from 1 to 1099511627776"),
    ("0 a 1.5 img", "size '1.5' is not an integer from 1 to 1099511627776"),
    ("0 a 1099511627777 img", "size '1099511627777' is not an integer from 1 to 1099511627776"),
    ("0 a " + "9" * 400 + " img", "is not an integer from 1 to"),
    ("0 a 10 im\x0bg", "image must not contain spaces"),
    ("0 a\u00e9 10 img", "layer_id must be printable ASCII without whitespace"),  # the cache's own rule
    ("0 " + "a" * 1025 + " 10 img", "layer_id must be 1-1024 characters, got 1025"),
])
def test_a_malformed_line_names_file_line_and_problem(tmp_path, line, problem):
    path = tmp_path / "bad.trace"
    path.write_text(f"# ok\n0 good 1 img\n\n{line}\n0 never 1 img\n")
    got = []
    with pytest.raises(tr.TraceFormatError) as info:
        for r in tr.read_trace(str(path)):
            got.append(r)
    assert got == [tr.Request(0.0, "good", 1, "img")]  # lazy: the lines before were read
    err = info.value
    assert isinstance(err, ValueError) and err.line == 4 and err.path == str(path)
    assert str(err).startswith(f"{path}, line 4: ") and problem in str(err)
    assert "expected 'time layer_id size image'" in str(err)


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.trace"
    path.write_bytes(b"0 good 1 img\n0 caf\xe9 1 img\n")
    with pytest.raises(tr.TraceFormatError) as info:
        list(tr.read_trace(str(path)))
    assert info.value.line == 2 and "not UTF-8" in str(info.value) and str(info.value).startswith(f"{path}, line 2: ")


def test_a_record_larger_than_the_bound_is_counted_without_making_it(tmp_path, Cache):
    """A layer of 1 TiB under a 1 MiB bound: refused as the cache would (too large), its bytes never
    made; the optimum cannot hold it either (it held part of it before)."""
    path = tmp_path / "big.trace"
    path.write_text("".join(f"{i} sha256:big {1 << 40} img{i}\n" for i in range(4)) + "9 sha256:small 100 imgx\n")
    result = rp.replay(rp.load_file(str(path)), 1.0, ["lru"], cache_class=Cache)
    (lru,) = result.policies
    assert lru.too_large == 4 and lru.hits == 0 and lru.requests == 5
    assert result.optimum_byte_hit_ratio == result.belady_byte_hit_ratio == 0.0


@pytest.mark.parametrize("bad", [tr.Request(0, "a b", 1, "i"), tr.Request(0, "a", 0, "i"),
                                 tr.Request(0, "a", 1, ""), tr.Request(float("inf"), "a", 1, "i"),
                                 tr.Request(0, "a", True, "i")])
def test_the_writer_refuses_what_it_could_not_read_back(bad):
    with pytest.raises(ValueError):
        tr.write_trace(io.StringIO(), [bad])


def test_scans_are_runs_of_one_image():
    reqs = [tr.Request(i, lid, 1, img) for i, (lid, img) in
            enumerate([("a", "x"), ("b", "x"), ("a", "y"), ("c", "x"), ("c", "x")])]
    assert [(img, [r.layer_id for r in run]) for img, run in tr.scans(reqs)] == [
        ("x", ["a", "b"]), ("y", ["a"]), ("x", ["c", "c"])]
    work = rp.load(reqs)
    assert work.layer_ids == ["a", "b", "c"] and work.scans == [("x", (0, 1)), ("y", (0,)), ("x", (2, 2))]


# -- the replay ---------------------------------------------------------------------------
def _lru_with_keep(scans: Sequence[Tuple[int, ...]], sizes: Sequence[int], capacity: int) -> Tuple[int, int, int]:
    """(hits, hit bytes, refused puts) of an exact LRU of whole records with the keep rule: a put
    evicts the least recently used records outside the scan's layers until it fits, or else
    changes nothing."""
    lru: "OrderedDict[int, None]" = OrderedDict()
    held = hits = hit_bytes = refused = 0
    for scan in scans:
        keep: Set[int] = set(scan)
        for obj in scan:
            if obj in lru:
                lru.move_to_end(obj)
                hits += 1
                hit_bytes += sizes[obj]
                continue
            victims, room = [], capacity - held
            for v in lru:
                if room >= sizes[obj]:
                    break
                if v not in keep:
                    victims.append(v)
                    room += sizes[v]
            if room < sizes[obj]:
                refused += 1
                continue
            for v in victims:
                del lru[v]
                held -= sizes[v]
            lru[obj] = None
            held += sizes[obj]
    return hits, hit_bytes, refused


def _requests(scans: Sequence[Tuple[int, ...]], sizes: Sequence[int]) -> List[tr.Request]:
    return [tr.Request(k * 0.001, f"sha256:{li:064x}", sizes[li], f"image-{n}")
            for n, scan in enumerate(scans) for k, li in enumerate(scan)]


def test_single_layer_scans_replay_as_exact_lru(Cache, tmp_path):
    rng = random.Random(7)
    sizes = [rng.randint(200, 3000) for _ in range(40)]
    scans = [(rng.choice(range(40)) if rng.random() < 0.5 else rng.choice(range(8)),) for _ in range(600)]
    result = rp.replay(rp.load(_requests(scans, sizes)), max_mb=0.01, policies=["lru"], tmp_dir=str(tmp_path),
                       cache_class=Cache)
    assert result.max_bytes == int(0.01 * 2**20)
    trace = [s[0] for s in scans]
    p, = result.policies
    assert p.policy == "lru" and p.requests == 600 and p.cache_full == p.too_large == 0
    assert p.hit_bytes == p.hit_stored == sim.lru_byte_hits(trace, sizes, result.max_bytes)
    assert p.requested_bytes == p.requested_stored == sum(sizes[li] for li in trace)
    assert p.final_stored <= result.max_bytes
    assert result.optimum_byte_hit_ratio == sim.optimum_byte_hits(trace, sizes, result.max_bytes) / p.requested_bytes
    assert result.optimum_byte_hit_ratio >= result.belady_byte_hit_ratio >= p.byte_hit_ratio > 0
    assert list(tmp_path.iterdir()) == []  # the caches' directory is gone


def test_multi_layer_scans_keep_their_layers(Cache, tmp_path):
    rng = random.Random(3)
    sizes = [rng.randint(300, 2500) for _ in range(60)]
    images = [tuple(rng.sample(range(60), rng.randint(1, 5))) for _ in range(25)]
    scans = [images[min(int(rng.expovariate(0.25)), 24)] for _ in range(300)]
    scans += [tuple(range(30))]  # a scan whose layers cannot all fit: CacheFull, counted
    work = rp.load(_requests(scans, sizes))
    assert len(work.scans) == len(scans)  # image-n: every scan is its own run
    result = rp.replay(work, max_mb=0.01, tmp_dir=str(tmp_path), cache_class=Cache)
    p, = [q for q in result.policies if q.policy == "lru"]
    hits, hit_bytes, refused = _lru_with_keep([layers for _image, layers in work.scans], work.sizes,
                                              result.max_bytes)
    assert (p.hits, p.hit_bytes, p.cache_full + p.too_large) == (hits, hit_bytes, refused)
    assert p.cache_full > 0
    assert p.cost_all_s == pytest.approx(sum(sim.analysis_seconds(sizes[li], 500, 40) for s in scans for li in s))


def test_a_record_larger_than_the_bound_is_counted(Cache, tmp_path):
    reqs = [tr.Request(0, "big", 20 * KIB, "i"), tr.Request(1, "small", 100, "i"), tr.Request(2, "big", 20 * KIB, "j"),
            tr.Request(3, "small", 100, "j")]
    result = rp.replay(rp.load(reqs), max_mb=0.01, policies=["lru"], tmp_dir=str(tmp_path), cache_class=Cache)
    p, = result.policies
    assert (p.hits, p.too_large, p.hit_bytes) == (1, 2, 100)
    assert p.cost_saved_s == pytest.approx(sim.analysis_seconds(100, 500, 40))


def test_policy_arguments():
    assert sim.policy_kwargs(None) == {}
    assert "lru" in sim.known_policies()
    import nvcache
    assert sim.policy_kwargs("lru") == ({"policy": "lru"} if hasattr(nvcache, "POLICIES") else {})
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        sim.policy_kwargs("nope")
    with pytest.raises(ValueError, match="unknown policy"):
        rp.replay(rp.load([tr.Request(0, "a", 1, "i")]), policies=["nope"])
    with pytest.raises(ValueError, match="above 0 MiB"):
        rp.replay(rp.load([tr.Request(0, "a", 1, "i")]), max_mb=0)


# -- the commands -------------------------------------------------------------------------
def test_simulate_trace_out_is_a_trace_replay_reads(tmp_path):
    out = tmp_path / "run.trace"
    args = ["simulate", "-p", "1", "--images", "6", "--layers", "30", "--scans", "40", "--max-mb", "0.05",
            "--analysis-us", "5", "--us-per-kib", "1", "--no-progress", "--path", str(tmp_path / "sim"),
            "--policy", "lru", "--trace-out", str(out)]
    doc = json.loads(run(args + ["--json"]).stdout)
    assert doc["policy"] == "lru" and doc["trace_out"] == str(out)
    requests = list(tr.read_trace(str(out)))
    assert len(requests) == doc["requests"]
    assert all(r.image.startswith("image-") and r.size > 0 for r in requests)
    assert [r.time for r in requests] == sorted(r.time for r in requests) and requests[0].time == 0.0
    cat = sim.build_catalogue(6, 30, 1)
    plan = sim.plan_scans(cat, 40, 1)
    assert [r.layer_id for r in requests] == [cat.layer_ids[li] for i in plan for li in cat.images[i]]
    replayed = run(["replay", str(out), "--max-mb", "0.05", "--json"])
    assert replayed.exit_code == 0, replayed.output
    figures = json.loads(replayed.stdout)
    assert figures["requests"] == doc["requests"] and figures["max_bytes"] == doc["max_bytes"]
    assert [p["policy"] for p in figures["policies"]] == list(sim.known_policies())
    table = run(args)  # the tables say which policy ran, and how to replay the trace
    assert table.exit_code == 0 and "| policy " in table.stdout and "| lru " in table.stdout
    assert f"replay {out}" in table.stdout


def test_a_one_process_raw_run_replays_to_its_own_figures(tmp_path):
    """simulate -p 1 --no-compress stores records as given, scan after scan: its trace replayed
    under LRU at the same bound gives the run's own hits and byte-hit ratio (README relies on it)."""
    out = tmp_path / "raw.trace"
    doc = json.loads(run(["simulate", "-p", "1", "--images", "20", "--layers", "120", "--scans", "150",
                          "--max-mb", "0.05", "--analysis-us", "1", "--us-per-kib", "0", "--no-progress",
                          "--no-compress", "--path", str(tmp_path / "sim"), "--trace-out", str(out),
                          "--json"]).stdout)
    figures = json.loads(run(["replay", str(out), "--max-mb", "0.05", "--policy", "lru", "--json"]).stdout)
    (lru,) = figures["policies"]
    assert doc["evictions"] > 0 and lru["evictions"] == doc["evictions"]
    assert (lru["requests"], lru["hits"]) == (doc["requests"], doc["hits"])
    assert lru["byte_hit_ratio"] == pytest.approx(doc["byte_hit_ratio"], abs=1e-12)


def test_an_unwritable_trace_out_fails_before_the_run(tmp_path):
    args = ["simulate", "-p", "1", "--images", "6", "--layers", "30", "--scans", "40", "--no-progress",
            "--path", str(tmp_path / "sim")]
    for target, problem in ((tmp_path / "nodir" / "x", "does not exist"), (tmp_path, "is a directory"),
                            ("/dev/null", "is not a regular file"),  # never renamed over
                            ("/proc/nvcache-trace", "cannot create a file in /proc")):
        result = run(args + ["--trace-out", str(target)])
        assert result.exit_code == 2 and problem in result.stderr, result.stderr
        assert not (tmp_path / "sim").exists()  # nothing ran


def test_replay_command_prints_its_table(tmp_path):
    path = tmp_path / "t.trace"
    tr.write_trace(str(path), _requests([(0, 1), (1, 2), (0, 1)], [1000, 2000, 3000]))
    result = run(["replay", str(path), "--max-mb", "1", "--policy", "lru"])
    assert result.exit_code == 0, result.output
    assert f"{path}: 3 scans, 6 requests" in result.stdout and "bound 1 MiB = 1048576 stored bytes" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| lru "))
    assert "3 of 6" in row and "50.0 %" in row
    assert "| Belady optimum (byte by byte: a bound) " in result.stdout
    assert "| Belady, whole records (heuristic) " in result.stdout


def test_replay_command_errors(tmp_path):
    missing = run(["replay", str(tmp_path / "nope.trace")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    bad = tmp_path / "bad.trace"
    bad.write_text("# a trace\n0 a 10 img\n1 b ten img\n")
    result = run(["replay", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: {bad}, line 3: size 'ten' is not an integer from 1 to 1099511627776 "
                                     "(expected 'time layer_id size image', got '1 b ten img')")
    empty = tmp_path / "empty.trace"
    empty.write_text("# nothing\n\n")
    result = run(["replay", str(empty)])
    assert result.exit_code == 1 and "no requests" in result.stderr
    ok = tmp_path / "ok.trace"
    ok.write_text("0 a 10 img\n")
    assert run(["replay", str(ok), "--policy", "nope"]).exit_code == 2
    assert run(["replay", str(ok), "--max-mb", "0"]).exit_code == 2
    assert run(["simulate", "--nodes", "2", "--trace-out", str(tmp_path / "x")]).exit_code == 2
    result = run(["simulate", "-p", "1", "--scans", "3", "--trace-out", str(tmp_path / "no" / "such.trace")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_every_policy_is_asked_for_by_name(Cache, tmp_path, monkeypatch):
    """With more than one policy (nvcache.POLICIES), each replay opens its cache with its name."""
    import nvcache
    opened = []

    class Named(Cache):  # stands for a LayerCache with the policy argument
        def __init__(self, path, max_mb=None, policy=None, **kwargs):
            super().__init__(path, max_mb, **kwargs)
            opened.append(policy)
            self._named = policy or "lru"

        @property
        def policy(self):
            return self._named

    monkeypatch.setattr(nvcache, "POLICIES", ("lru", "other"), raising=False)
    assert sim.known_policies() == ("lru", "other") and sim.policy_kwargs("other") == {"policy": "other"}
    reqs = [tr.Request(i, f"L{i % 3}", 100, "img") for i in range(6)]
    result = rp.replay(rp.load(reqs), max_mb=0.01, tmp_dir=str(tmp_path), cache_class=Named)
    assert [p.policy for p in result.policies] == ["lru", "other"] and opened == ["lru", "other"]
    assert [p.hits for p in result.policies] == [3, 3]
    assert result.as_dict()["policies"][1]["gap_closed"] is None  # no gap: both at the optimum


@pytest.mark.parametrize("policy", sim.known_policies())
def test_simulate_runs_the_policy_asked_for(tmp_path, policy):
    args = ["simulate", "-p", "1", "--images", "6", "--layers", "30", "--scans", "30", "--max-mb", "0.02",
            "--analysis-us", "5", "--us-per-kib", "1", "--no-progress", "--path", str(tmp_path / "sim"),
            "--policy", policy, "--json"]
    doc = json.loads(run(args).stdout)
    assert doc["policy"] == policy and doc["requests"] == doc["hits"] + doc["misses"] > 0
