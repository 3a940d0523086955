"""bench/policies.py, the offline policy simulator: its LRU is simulate's model, and every policy (the
chosen one above all) keeps the cache's rules: the bound in stored bytes, keep, no record larger
than the bound. Small traces: a few seconds in all."""

import math
import os
import sys

import pytest

from nvcache import simulate as sim

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import policies as P  # noqa: E402

CHOSEN = P.CHOSEN


@pytest.fixture(scope="module")
def small() -> "P.Trace":
    cat = sim.build_catalogue(60, 400, seed=3)
    plan = sim.plan_scans(cat, 800, seed=3)
    trace = P.Trace("small", [cat.images[i] for i in plan], list(cat.layer_ids), list(cat.sizes))
    return P.measure(trace)  # scanner-shaped records, zstd with a dictionary trained on them


def _cost(trace: "P.Trace") -> list:
    return [P.cost_ns(n, 500.0, 40.0) for n in trace.record_sizes]


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_lru_is_simulates_model(small: "P.Trace", fraction: float) -> None:
    reqs = small.requests()
    cap = int(sum(small.stored[i] for i in set(reqs)) * fraction)
    out = P.simulate(P.LRU, small, cap, _cost(small), keep_rule=False)
    assert out.hit_stored == sim.lru_byte_hits(reqs, small.stored, cap)
    assert out.hit_stored <= sim.optimum_byte_hits(reqs, small.stored, cap)


@pytest.mark.parametrize("name", list(P.policies(500.0, 40.0)))
def test_bound_and_keep(small: "P.Trace", name: str) -> None:
    cls = P.policies(500.0, 40.0)[name]
    reqs = small.requests()
    total = sum(small.stored[i] for i in set(reqs))
    for fraction in (0.03, 0.2):
        cap = int(total * fraction)
        out = P.simulate(cls, small, cap, _cost(small), check=True)  # asserts after every put
        assert out.hit_stored <= sim.optimum_byte_hits(reqs, small.stored, cap)
        assert out.requests == len(reqs)


def test_chosen_policy_rules(small: "P.Trace") -> None:
    cls = P.policies(500.0, 40.0)[CHOSEN]
    cost = _cost(small)
    big = max(range(len(small.stored)), key=small.stored.__getitem__)
    cap = small.stored[big] - 1  # the largest record does not fit: never admitted
    p = cls(cap, small.stored, cost)
    assert not p.admit(big, P.EMPTY) and big not in p.held and p.used == 0
    # Kept records are passed over; when only kept ones could make room, nothing changes.
    cap = sum(sorted(small.stored)[-3:])
    p = cls(cap, small.stored, cost)
    order = sorted(range(len(small.stored)), key=small.stored.__getitem__)
    a, b = order[-3], order[-2]
    assert p.admit(a, P.EMPTY) and p.admit(b, P.EMPTY)
    keep = frozenset({a, b})
    filler = order[-1]
    if small.stored[a] + small.stored[b] + small.stored[filler] > cap:
        state = (dict(p.held), p.used)
        assert not p.admit(filler, keep)
        assert (dict(p.held), p.used) == state
    # The rank is an integer, a function of (refs, size, cost, L): the same run gives the same ranks.
    runs = []
    for _ in range(2):
        q = cls(int(sum(small.stored) * 0.1), small.stored, cost)
        for scan in small.scans:
            keep = frozenset(scan)
            for obj in scan:
                if obj in q.held:
                    q.hit(obj)
                else:
                    q.admit(obj, keep)
        assert all(type(r) is int and 0 <= r <= P.U64_MAX for r in q.held.values())
        runs.append((dict(q.held), q.L))
    assert runs[0] == runs[1]


def test_chosen_rank_formula() -> None:
    cls = P.policies(500.0, 40.0)[CHOSEN]
    stored = [100, 4000]
    cost = [P.cost_ns(300, 500.0, 40.0), P.cost_ns(60000, 500.0, 40.0)]
    p = cls(10_000, stored, cost)
    for obj in (0, 1):
        assert p.rank(obj, 0) == p.L + p.value(cost[obj], stored[obj])
        assert p.rank(obj, 40) == p.L + 16 * p.value(cost[obj], stored[obj])  # frequency capped at 16
    p.L = 12345
    assert p.rank(0, 2) == 12345 + 3 * p.value(cost[0], stored[0])


# -- bench/policies2.py: the second round's candidates ----------------------------------------
import policies2 as Q  # noqa: E402


@pytest.mark.parametrize("name", list(Q.candidates()))
def test_round2_bound_and_keep(small: "P.Trace", name: str) -> None:
    cls = Q.candidates()[name]
    reqs = small.requests()
    total = sum(small.stored[i] for i in set(reqs))
    for fraction in (0.03, 0.2):
        cap = int(total * fraction)
        out = P.simulate(cls, small, cap, _cost(small), check=True)  # asserts after every put
        assert out.hit_stored <= sim.optimum_byte_hits(reqs, small.stored, cap)


def test_lrfu_rules(small: "P.Trace") -> None:
    cls = Q.candidates()[Q.RECOMMENDED]
    cost = _cost(small)
    big = max(range(len(small.stored)), key=small.stored.__getitem__)
    p = cls(small.stored[big] - 1, small.stored, cost)
    assert not p.admit(big, P.EMPTY) and big not in p.held and p.used == 0  # too large: not admitted
    # The rank: 2**40 + last + H × min(log2 CRF, cap), CRF = 1 + CRF_old × 2**(-(now − last)/H).
    p = cls(10**9, small.stored, cost)
    assert p.admit(0, P.EMPTY)
    assert p.held[0] == (1 << 40) + p.clock  # CRF 1 at the put
    t0 = p.clock
    p.clock += 999  # 999 other requests later (the clock counts requests)
    p.hit(0)
    crf = 1 + 2.0 ** (-1000 / cls.H)
    assert p.held[0] == (1 << 40) + p.clock + int(cls.H * min(math.log2(crf), cls.cap))
    assert p.clock == t0 + 1000
    for _ in range(200):
        p.hit(0)
    assert p.held[0] == (1 << 40) + p.clock + int(cls.H * cls.cap)  # capped
    # Ghosts: bounded, and a layer that comes back starts from its decayed CRF, not from 1.
    runs = []
    for _ in range(2):
        q = cls(int(sum(small.stored) * 0.05), small.stored, cost)
        for scan in small.scans:
            keep = frozenset(scan)
            for obj in scan:
                if obj in q.held:
                    q.hit(obj)
                else:
                    q.admit(obj, keep)
                assert len(q.ghost) <= q.ghost_mult * max(1, len(q.held))
                assert not (set(q.ghost) & set(q.held))
        assert q.evictions > 0 and q.ghost
        assert all(type(r) is int and 0 <= r <= P.U64_MAX for r in q.held.values())
        runs.append(dict(q.held))
    assert runs[0] == runs[1]  # deterministic
