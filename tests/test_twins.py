"""The compiled core's C paths agree with fallback.py, the specification (hypothesis).

Writes: the same scripts run through the compiled Writer (C paths) on one
cache file and through fallback.py (py-lmdb transactions) on another; the
databases, results and exceptions must be identical. Birth stamps are the
one thing that differs by design (each insert stamps its own clock time):
the comparison zeroes them after checking that each file agrees with
itself, and every last reference is given explicitly (``last_ns``), so
the eviction order never depends on the clock. Applies are driven with
each file's own birth stamps (matching) or one off (stale).
Reads: the compiled Reader and fallback's Reader on one file.
"""

import os
import struct

import lmdb
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nvcache
from nvcache import _index as compiled  # a missing build fails here, never skips
from nvcache import fallback
from nvcache.errors import StaleReader
from nvcache.cachedir import format_dir
from payloads import incompressible

texts = st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7f),
                                                 min_size=1, max_size=40), st.integers(), st.none(), st.binary())
Ext = type("LayerCache_ext", (nvcache.LayerCache,), {"_core": compiled})
Py = type("LayerCache_py", (nvcache.LayerCache,), {"_core": fallback})


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the type is the behaviour being compared
        return ("raises", type(exc))


def key_of(i):
    return fallback.record_key(f"sha256:{i}", "layer_file")


@settings(max_examples=400, deadline=None)
@given(texts, texts)
def test_record_name_and_key(layer_id, kind):
    assert outcome(compiled.record_name, layer_id, kind) == outcome(fallback.record_name, layer_id, kind)
    assert outcome(compiled.record_key, layer_id, kind) == outcome(fallback.record_key, layer_id, kind)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**16 - 1), st.binary(min_size=1, max_size=60))
def test_header_round_trip(size, refs, last, check, born, rank, lid, name):
    packed = compiled.pack_header(size, refs, last, check, born, rank, lid, name)
    assert packed == fallback.pack_header(size, refs, last, check, born, rank, lid, name)
    assert len(packed) == compiled.HEADER_SIZE + len(name) == fallback.HEADER_SIZE + len(name)
    assert (compiled.unpack_header(packed) == fallback.unpack_header(packed)
            == (size, refs, last, check, born, rank, lid, name))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**63 - 1), st.binary(min_size=16, max_size=16))
def test_time_and_keys(ns, key):
    assert compiled.rfc3339nano(ns) == fallback.rfc3339nano(ns)
    assert compiled.lru_key(ns, key) == fallback.lru_key(ns, key)
    assert compiled.name_key(key) == fallback.name_key(key)
    assert compiled.checksum(key) == fallback.checksum(key)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.integers(0, 2**52), st.integers(2**64 - 2**20, 2**64 - 1)),
       st.one_of(st.integers(-2**40, 40_000), st.integers(-2**64, 2**64)), st.integers(0, 2**64 - 1))
@example(10_000, 0, 1)
@example(10_000, 30_000, 1)
@example(10_000, -640_001, 7)
@example(10_000, -640_001, 0)  # no references (a merged history): the rank stays
@example(0, 10**8, 1)  # a damaged rank far above the clock
@example(2**64 - 1, 0, 3)  # a saturated clock
@example(0, 2**64 - 1, 1)
def test_lrfu_rank_is_the_same_number_in_both_cores(tick, offset, n):
    rank = min(max(0, tick + offset), 2**64 - 1)
    got = compiled.lrfu_access(rank, n, tick)
    assert got == fallback.LRFU.access(rank, 0, n, tick)
    assert 0 <= got < 2**64 and (got == rank if n == 0 else got >= tick)


def test_layout_constants():
    for name in ("KEY_SIZE", "HEADER_SIZE", "PREFIX_SIZE", "RANK_SIZE", "CHUNK_SIZE", "MAX_RECORD", "U64_MAX",
                 "MAX_LAYER_ID", "MAX_KIND", "RECORDS", "ACCESS", "EVICTIONS"):
        assert getattr(compiled, name) == getattr(fallback, name), name
    assert fallback.PREFIX_SIZE + fallback.CHUNK_SIZE == 65504  # chunk 0's value: 16 pages
    # the core's interface (DEVELOPERS.md): the same names in both twins
    for name in ("record_name", "record_key", "name_key", "keep_set", "checksum", "pack_header", "unpack_header",
                 "lru_key", "rfc3339nano", "link_count", "FAST_READS", "AccessBuffer", "Index", "Reader", "Writer"):
        assert hasattr(compiled, name) and hasattr(fallback, name), name
    for cls, names in (("Index", ("victims", "insert", "remove", "apply", "exists", "history", "records",
                                  "counters", "count", "lookup", "walk", "dump", "cache_data", "check",
                                  "clear", "init_counters", "dictionary", "current_dictionary", "add_dictionary",
                                  "tally", "add_tally",
                                  "sample")),
                       ("Reader", ("lookup", "find", "lookup_many", "contains", "cache_data", "close", "fast",
                                   "direct", "shared", "codec", "last_txn")),
                       ("Writer", ("begin", "close", "last_page")),
                       ("AccessBuffer", ("hit", "miss", "count", "take", "restore", "clear"))):
        for name in names:
            assert hasattr(getattr(compiled, cls), name) and hasattr(getattr(fallback, cls), name), (cls, name)
    assert not hasattr(compiled.Index, "reserve") and not hasattr(fallback.Index, "reserve")


hit_lists = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 2**62), st.integers(0, 2)), max_size=20)


def _model_hits(pending, hits):
    """The rule, spelled out: a hit of another record (birth) restarts the key's entry."""
    for i, ns, born in hits:
        entry = pending.get(key_of(i))
        if entry is None or entry[2] != born:
            pending[key_of(i)] = [1, ns, born]
        else:
            entry[0] += 1
            entry[1] = max(entry[1], ns)
    return pending


def _model_restore(pending, taken):
    """Same birth: merged; different births: the newer record's entry stays."""
    for key, (refs, last, born) in taken.items():
        entry = pending.get(key)
        if entry is None or born > entry[2]:
            pending[key] = [refs, last, born]
        elif born == entry[2]:
            entry[0] += refs
            entry[1] = max(entry[1], last)
    return pending


@settings(max_examples=200, deadline=None)
@given(hit_lists, hit_lists, st.integers(0, 5))
def test_access_buffer(first, second, misses):
    bufs = [core.AccessBuffer(10**9, 8) for core in (compiled, fallback)]
    for buf in bufs:
        for i, ns, born in first:
            buf.hit(key_of(i), ns, born)
        for _ in range(misses):
            buf.miss(7)
    assert len(bufs[0]) == len(bufs[1]) and bufs[0].due == bufs[1].due
    taken = [b.take() for b in bufs]
    assert taken[0] == taken[1]
    assert taken[1][:3] == (_model_hits({}, first), len(first), misses)
    for buf, t in zip(bufs, taken):
        for i, ns, born in second:
            buf.hit(key_of(i), ns, born)
        buf.restore(t)
    after = [b.take() for b in bufs]
    assert after[0] == after[1]
    assert after[1][0] == _model_restore(_model_hits({}, second), _model_hits({}, first))
    assert after[1][1:3] == (len(first) + len(second), misses)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([b"x", None, False]), st.integers(0, 2)),
                max_size=20))
def test_access_buffer_count(lookups):
    """count(): a hit when the lookup returned bytes, else a miss; the time is the clock's."""
    for core in (compiled, fallback):
        buf = core.AccessBuffer(10**12, 1000)
        for i, data, born in lookups:
            buf.count(key_of(i), data, born)
        pending, hits, misses, first_ns, first_txn = buf.take()
        assert first_txn == 0  # no reader: every read counts as snapshot 0
        expected = _model_hits({}, [(i, 0, born) for i, data, born in lookups if data is not None and data is not False])
        assert {k: (e[0], e[2]) for k, e in pending.items()} == {k: (e[0], e[2]) for k, e in expected.items()}
        assert (hits, misses) == (sum(1 for _i, d, _b in lookups if d == b"x"), sum(1 for _i, d, _b in lookups if d != b"x"))
        assert all(e[1] > 10**18 for e in pending.values()) and (first_ns > 10**18 or not lookups)


def _fields(buf):
    return (buf.pending, buf.hits, buf.misses, buf.first_ns, buf.first_txn, buf.due, buf.max_age_ns,
            buf.max_keys, buf.max_writes, len(buf))


# Accesses: a hit (record, born) or a miss; the clock (ns) and the snapshot's write transaction id
# only move forward, except that a replaced file starts its ids again (txn may go down).
accesses = st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 2), st.integers(0, 40),
                              st.integers(-3, 12)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(accesses, st.integers(1, 200), st.integers(1, 6), st.integers(1, 20), st.integers(0, 30))
@example([(True, 0, 0, 1, 0)] + [(True, 0, 0, 1, 1)] * 8, 10**6, 100, 8, 0)  # 7 writes: not due; 8: due
@example([(True, 0, 0, 1, 0)] * 3 + [(True, 0, 0, 1, 5)], 10**6, 100, 2, 99)  # id 0 first: 5 is the first known
def test_access_buffer_due(script, max_age, max_keys, max_writes, take_at):
    """due: the oldest access's age, the pending keys, or the writes since its snapshot; same fields in both twins."""
    bufs = [core.AccessBuffer(max_age, max_keys, max_writes) for core in (compiled, fallback)]
    assert _fields(bufs[0]) == _fields(bufs[1])
    ns = txn = 0
    first = None  # (ns, txn) of the oldest access since the last take
    keys = set()
    due = False
    for step, (is_hit, i, born, dns, dtxn) in enumerate(script):
        if step == take_at:
            taken = [b.take() for b in bufs]
            assert taken[0] == taken[1]
            first, keys, due = None, set(), False
        ns, txn = ns + 1 + dns, txn + dtxn
        for buf in bufs:
            if is_hit:
                buf.hit(key_of(i), ns, born, txn)
            else:
                buf.miss(ns, txn)
        if is_hit:
            keys.add(i)
        if first is None:
            first = (ns, txn)
        else:
            if first[1] == 0:  # no snapshot id at the first access: the next known one stands for it
                first = (first[0], txn)
            if ns - first[0] >= max_age or len(keys) >= max_keys or (first[1] and txn - first[1] >= max_writes):
                due = True
        assert _fields(bufs[0]) == _fields(bufs[1])
        assert bufs[0].due == due and (bufs[0].first_ns, bufs[0].first_txn) == first
    taken = [b.take() for b in bufs]
    assert taken[0] == taken[1]
    for buf in bufs:  # a failed apply's restore keeps the older first access, with its snapshot
        buf.hit(key_of(9), ns + 5, 0, txn + 5)
        buf.restore(taken[0])
    assert _fields(bufs[0]) == _fields(bufs[1])
    assert (bufs[0].first_ns, bufs[0].first_txn) == (first if first else (ns + 5, txn + 5))


@pytest.mark.parametrize("Cache", [Ext, Py], ids=["ext", "py"])
def test_count_takes_the_snapshot_of_the_read(tmp_path, Cache):
    """count() reads the Reader's last_txn: the write transaction id of the snapshot the get read."""
    with Cache(str(tmp_path / "c"), 1) as cache:
        store = cache._store
        assert store.buffer.reader is store.reader and store.reader.last_txn == 0
        for i in range(3):
            cache.put(f"sha256:{i}", b"x" * 100)
        last = store.files.env.info()["last_txnid"]
        assert cache.get("sha256:0") == b"x" * 100
        assert store.reader.last_txn == last and store.buffer.first_txn == last
        cache.put("sha256:9", b"y" * 100)
        assert cache.get("sha256:8") is None  # a miss reads a snapshot too
        assert store.reader.last_txn == last + 1 and store.buffer.first_txn == last
        twin = fallback.Reader(store.lock, store.files.env, store.files.index.twin
                               if Cache is Ext else store.files.index)
        twin.lookup(key_of(0))
        assert twin.last_txn == store.reader.last_txn


def test_keep_set_is_shared():
    assert compiled.keep_set is fallback.keep_set


def test_the_compiled_core_forwards_cold_calls_to_the_twin(tmp_path):
    """Handed a py-lmdb transaction, the compiled Index is fallback.Index over the same databases."""
    with Ext(str(tmp_path), 1) as cache:
        cache.put("sha256:a", b"A")
        index = cache._store.files.index
        assert isinstance(index.twin, fallback.Index)
        assert (index.idx, index.dat, index.lru, index.meta) == (index.twin.idx, index.twin.dat,
                                                                 index.twin.lru, index.twin.meta)
        with cache._store.files.env.begin() as txn:
            assert index.lookup(txn, key_of("a"))[0] == b"A"
            assert index.counters(txn) == index.twin.counters(txn)
            assert index.dump(txn) == index.twin.dump(txn)
        writer = cache._store.files.writer
        assert type(writer) is compiled.Writer and writer.begin() is writer
        try:
            assert index.exists(writer, key_of("a")) and not index.exists(writer, key_of("b"))
            assert index.records(writer) == (1, 1)
        finally:
            writer.abort()


def _read_both(store, key_sets):
    """Each read of the compiled Reader and of fallback's Reader on the same file."""
    index = fallback.Index(*[getattr(store.files.index, n) for n in ("idx", "dat", "lru", "meta", "ghost")])
    index.use_policy(store.policy)  # the dump's order of equal ranks is the policy's
    twin = fallback.Reader(store.lock, store.files.env, index)
    out = []
    for reader in (store.reader, twin):
        out.append(([reader.lookup(k) for k in key_sets[0]], reader.lookup_many(key_sets[0]),
                    reader.lookup_many(key_sets[1]), [reader.contains(k) for k in key_sets[0]],
                    reader.cache_data()))
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 4), st.binary(max_size=300)), max_size=40),
       st.lists(st.integers(0, 40), max_size=5), st.sets(st.integers(0, 40), max_size=4),
       st.sets(st.integers(0, 40), max_size=4), st.lists(st.integers(0, 42), max_size=8))
@example([(i, 1, b"x" * 10) for i in range(5)], [], set(), set(), [])
@pytest.mark.parametrize("policy", nvcache.POLICIES)
def test_c_reads_match_the_twin(tmp_path_factory, policy, records, dangling, no_bytes, bad_bytes, batch):
    """The compiled Reader's C path (lookup, lookup_many, contains, the dump) agrees with fallback.Reader."""
    with Ext(str(tmp_path_factory.mktemp("c")), 1, policy=policy) as cache:
        for i, when, data in records:  # few distinct times: many ties, broken by name
            cache.restore(f"sha256:{i}", data, reference_count=i, last_referred_ns=when * 10**9)
        store = cache._store
        assert store.reader.direct and store.reader.fast
        txn = store.files.env.begin(write=True)  # damage that every read must report alike
        for i in dangling:  # lru entries without a record: both walks skip them
            txn.put(b"\0" * 8 + os.urandom(16), b"", db=store.files.index.lru)
        for i in no_bytes:  # an index entry without bytes: damaged (False), not absent
            txn.delete(key_of(i) + b"\0\0\0\0", db=store.files.index.dat)
        for i in bad_bytes - no_bytes:  # bytes that fail their checksum
            first = txn.get(key_of(i) + b"\0\0\0\0", None, store.files.index.dat)
            if first is not None and len(first) > fallback.PREFIX_SIZE:
                txn.put(key_of(i) + b"\0\0\0\0", first[:-1] + bytes([first[-1] ^ 1]), db=store.files.index.dat)
        txn.commit()
        keys = [key_of(i) for i in range(42)]
        ext, twin = _read_both(store, (keys, [key_of(i) for i in batch]))
        assert ext == twin
        assert all(born > 0 if type(data) is bytes else born == enc == 0 for data, born, enc in ext[0])
        assert any(enc for _data, _born, enc in ext[0]) == any(len(set(d)) < len(d) // 4 for _i, _w, d in records
                                                                if len(d) > 64)  # compressed ones say so
        assert isinstance(store.files.env, lmdb.Environment)


ops = st.lists(st.one_of(
    # insert: record i, size, kept records, references, last reference (few distinct: ties)
    st.tuples(st.just("insert"), st.integers(0, 12), st.integers(0, 700), st.sets(st.integers(0, 12), max_size=4),
              st.integers(0, 3), st.integers(1, 3)),
    st.tuples(st.just("remove"), st.integers(0, 14)),
    # apply: buffered references (record, count, last reference, its birth or a stale one), hits, misses
    st.tuples(st.just("apply"), st.lists(st.tuples(st.integers(0, 14), st.integers(1, 3), st.integers(1, 6),
                                                   st.booleans()), max_size=6),
              st.integers(0, 3), st.integers(0, 3)),
    # restore: hits buffered, taken, more hits, restored, then applied (record, last reference, birth or stale)
    st.tuples(st.just("restore"), st.lists(st.tuples(st.integers(0, 14), st.integers(1, 6), st.booleans()),
                                           max_size=6),
              st.lists(st.tuples(st.integers(0, 14), st.integers(1, 6), st.booleans()), max_size=6)),
), max_size=40)


def _born(store, key):
    """The birth stamp in a record's idx header (0 when absent)."""
    with store.files.env.begin() as t:
        hdr = t.get(key, None, store.files.index.idx)
    return struct.unpack_from("<Q", hdr, 32)[0] if hdr is not None and len(hdr) > fallback.HEADER_SIZE else 0


def _stamp(store, i, fresh):
    born = _born(store, key_of(i))
    return born if fresh else born + 1  # one off: a pending entry of another record of that name


def _step(core, store, txn, op, bound):
    """One script step through ``core``'s Index (the compiled one is handed the Writer: its C paths)."""
    index = store.files.index
    if op[0] == "insert":
        _, i, size, keep, refs, when = op
        name, lid = core.record_name(f"sha256:{i}", "layer_file")
        got = outcome(index.victims, txn, size, bound, frozenset(f"sha256:{k}".encode() for k in keep))
        if got[0] != "ok":
            return [got]
        return [got, outcome(index.insert, txn, key_of(i), name, lid, bytes([i % 251]) * size, got[1], refs,
                             when * 10**9, i % 2)]  # the encoding: stored as given, in both cores
    if op[0] == "remove":
        return [outcome(index.remove, txn, key_of(op[1]))]
    if op[0] == "apply":
        _, entries, hits, misses = op
        pending = {key_of(i): [count, when * 10**9, _stamp(store, i, fresh)] for i, count, when, fresh in entries}
        return [outcome(index.apply, txn, pending, hits, misses)]
    _, first, second = op
    buf = core.AccessBuffer(1 << 62, 1 << 30)
    for i, when, fresh in first:
        buf.hit(key_of(i), when * 10**9, _stamp(store, i, fresh))
    taken = buf.take()
    for i, when, fresh in second:
        buf.hit(key_of(i), when * 10**9 + 1, _stamp(store, i, not fresh))
    buf.restore(taken)
    pending, hits, misses, _first_ns, _first_txn = buf.take()
    return [outcome(index.apply, txn, pending, hits, misses)]


def _contents(store):
    """All five tables, birth stamps zeroed (after checking each record's two copies agree)."""
    index = store.files.index
    with store.files.env.begin() as t:
        tables = [list(t.cursor(db)) for db in (index.idx, index.dat, index.lru, index.meta, index.ghost)]
    idx, dat = dict(tables[0]), dict(tables[1])
    for key, hdr in idx.items():
        assert dat[key + b"\0\0\0\0"][16:24] == hdr[32:40]
    tables[0] = [(k, v[:32] + bytes(8) + v[40:]) for k, v in tables[0]]
    tables[1] = [(k, v[:16] + bytes(8) + v[24:] if k.endswith(b"\0\0\0\0") else v) for k, v in tables[1]]
    tables[3] = [(k, v) for k, v in tables[3] if k not in (b"boot", b"readers")]
    return tables


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(500, 3000))
# Ties broken by name, not by key: sha256:3's key sorts before sha256:0's.
@example([("insert", i, 125, set(), 0, 1) for i in range(4)] + [("insert", 9, 125, set(), 0, 2)], 500)
@example([("insert", i, 125, set(), 0, 1) for i in range(4)] + [("insert", 9, 125, {0}, 0, 2)], 500)
# A re-put record: buffered references of the old one (stale birth) are dropped, its own applied.
@example([("insert", 1, 100, set(), 0, 1), ("remove", 1), ("insert", 1, 100, set(), 0, 2),
          ("apply", [(1, 3, 5, False)], 1, 0), ("apply", [(1, 2, 4, True)], 0, 1),
          ("restore", [(1, 3, True)], [(1, 6, True)])], 3000)
# LRFU: an evicted record's ghost, taken back by its next insert.
@example([("insert", i, 300, set(), 0, 1) for i in range(3)] + [("apply", [(0, 2, 2, True)], 2, 1)]
         + [("insert", 0, 300, {1, 2}, 0, 2), ("insert", 5, 300, set(), 0, 2), ("insert", 0, 300, set(), 0, 3)], 1000)
@pytest.mark.parametrize("policy", nvcache.POLICIES)
def test_c_writes_match_the_twin(tmp_path_factory, policy, script, bound):
    """The compiled Writer's victims, inserts, removes and applies (LMDB's C API) leave the same
    databases as fallback.py's on py-lmdb transactions, with the same results and exceptions,
    under every policy."""
    caches = [Ext(str(tmp_path_factory.mktemp("w")), bound / 1048576, policy=policy),
              Py(str(tmp_path_factory.mktemp("w")), bound / 1048576, policy=policy)]
    try:
        stores = [c._store for c in caches]
        assert type(stores[0].files.writer) is compiled.Writer and type(stores[0].files.index) is compiled.Index
        assert type(stores[1].files.index) is fallback.Index
        assert stores[0].files.index.policy is stores[1].files.index.policy is fallback.POLICIES[policy]
        results = [[], []]
        for op in script:
            for n, (core, store) in enumerate(zip((compiled, fallback), stores)):
                txn = store.files.writer.begin()
                got = _step(core, store, txn, op, bound)
                results[n].append(got)
                if got[-1][0] == "ok":
                    txn.commit()
                else:
                    txn.abort()
        assert results[0] == results[1]
        assert _contents(stores[0]) == _contents(stores[1])
        with stores[0].files.env.begin() as t0, stores[1].files.env.begin() as t1:
            assert stores[0].files.index.counters(t0) == stores[1].files.index.counters(t1)
        assert caches[0].verify() == [] and caches[1].verify() == []
    finally:
        for c in caches:
            c.close()


def test_one_path_one_core_per_process(tmp_path):
    """The store of a path is shared in a process: a cache of the other core on it is refused."""
    with Ext(str(tmp_path), 1) as first:
        first.put("sha256:a", b"A")
        with pytest.raises(nvcache.CacheError, match="other core"):
            Py(str(tmp_path), 1)
        assert first.get("sha256:a") == b"A" and first.verify() == []
    with Py(str(tmp_path), 1) as again:  # once closed, the path is free for either core
        assert again.get("sha256:a") == b"A"


def _data_mappings(path):
    """Start addresses of this process's mappings of ``path``/data.mdb."""
    target = os.path.join(format_dir(os.path.realpath(path)), "data.mdb")
    with open("/proc/self/maps") as f:
        return {line.split("-", 1)[0] for line in f if line.rstrip("\n").endswith(" " + target)}


def test_compiled_reads_share_the_write_environment(tmp_path):
    """The compiled Reader reads through the Writer's environment, also after a rebuild.

    data.mdb is then mapped twice (py-lmdb's environment, which the cold paths
    use, and the compiled one), not three times.
    """
    with Ext(str(tmp_path), 1) as cache:
        cache.put("sha256:a", b"A")
        reader = cache._store.reader
        assert reader.direct and reader.shared
        assert cache.get("sha256:a") == b"A"
        assert len(_data_mappings(str(tmp_path))) == 2
        cache._store._failure(lmdb.CorruptedError("test: as if damage was found"))
        assert cache.put("sha256:b", b"B") is True  # rebuilds, then stores
        assert cache._store.reader is not reader and cache._store.reader.shared
        assert cache.get("sha256:b") == b"B" and cache.get("sha256:a") is None
        assert len(_data_mappings(str(tmp_path))) == 2  # the old file's mappings went with it
        assert cache.verify() == []
    assert not _data_mappings(str(tmp_path))


class _NoEnv:
    """A stand-in py-lmdb environment whose directory does not exist."""

    def __init__(self, path):
        self._path = path

    def path(self):
        return self._path

    def info(self):
        return {"map_size": 1 << 30}


def test_a_writer_that_cannot_open_raises_lmdb_error_and_the_store_a_cache_error(tmp_path):
    """No py-lmdb write path in the compiled core: its Writer raises lmdb.Error; opening fails cleanly."""
    import types

    with pytest.raises(lmdb.Error):
        compiled.Writer(_NoEnv(str(tmp_path / "missing")), False, False)

    def failing(env, writemap, durable):
        return compiled.Writer(_NoEnv(str(tmp_path / "missing")), writemap, durable)
    core = types.ModuleType("nvcache._index_without_writer")
    core.__dict__.update({k: v for k, v in vars(compiled).items() if not k.startswith("__")})
    core.Writer = failing
    Broken = type("LayerCache_broken", (nvcache.LayerCache,), {"_core": core})
    with pytest.raises(nvcache.CacheError, match="no write environment"):
        Broken(str(tmp_path / "c"), 1)
    with Ext(str(tmp_path / "c"), 1) as cache:  # nothing was left half open
        assert cache.put("sha256:a", b"A") and cache.get("sha256:a") == b"A" and cache.verify() == []


class _ElsewhereEnv:
    """The store's py-lmdb environment, but naming a directory that does not exist (for the C open)."""

    def __init__(self, env, path):
        self._env, self._path = env, path

    def path(self):
        return self._path

    def __getattr__(self, name):
        return getattr(self._env, name)


def test_a_reader_whose_c_environment_cannot_open_reads_through_the_twin(tmp_path):
    """The compiled Reader falls back to fallback.Reader for good: same results, no C path."""
    with Ext(str(tmp_path / "c"), 1) as cache:
        for i in range(6):
            cache.restore(f"sha256:{i}", incompressible((i * 40), i), reference_count=i, last_referred_ns=(i % 2 + 1) * 10**9)
        store = cache._store
        c_reader = store.reader
        py_path = compiled.Reader(store.lock, _ElsewhereEnv(store.files.env, str(tmp_path / "missing")), store.files.index)
        try:
            assert c_reader.direct and not py_path.direct and not py_path.shared
            keys = [key_of(i) for i in range(8)]
            for reader in (c_reader, py_path):
                assert [reader.lookup(k)[0] for k in keys] == [incompressible((i * 40), i) for i in range(6)] + [None] * 2
            assert [py_path.lookup(k) for k in keys] == [c_reader.lookup(k) for k in keys]
            assert py_path.lookup_many(keys) == c_reader.lookup_many(keys)
            assert [py_path.contains(k) for k in keys] == [c_reader.contains(k) for k in keys]
            assert py_path.cache_data() == c_reader.cache_data()
        finally:
            with store.lock.mutex:
                py_path.close()
        with pytest.raises(StaleReader):
            py_path.lookup(keys[0])
