"""The compiled index and its pure-Python twin agree function by function (hypothesis)."""

import os

import lmdb
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nvcache
from nvcache import _index as compiled  # a missing build fails here, never skips
from nvcache import fallback

texts = st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7f),
                                                 min_size=1, max_size=40), st.integers(), st.none(), st.binary())


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the type is the behaviour being compared
        return ("raises", type(exc))


@settings(max_examples=400, deadline=None)
@given(texts, texts)
def test_record_name(layer_id, kind):
    assert outcome(compiled.record_name, layer_id, kind) == outcome(fallback.record_name, layer_id, kind)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**16 - 1), st.binary(min_size=1, max_size=60))
def test_header_round_trip(size, refs, last, check, lid, name):
    packed = compiled.pack_header(size, refs, last, check, lid, name)
    assert packed == fallback.pack_header(size, refs, last, check, lid, name)
    assert compiled.unpack_header(packed) == fallback.unpack_header(packed) == (size, refs, last, check, lid, name)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**63 - 1), st.binary(min_size=16, max_size=16))
def test_time_and_keys(ns, key):
    assert compiled.rfc3339nano(ns) == fallback.rfc3339nano(ns)
    assert compiled.lru_key(ns, key) == fallback.lru_key(ns, key)
    assert compiled.name_key(key) == fallback.name_key(key)
    assert compiled.checksum(key) == fallback.checksum(key)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.integers(1, 2**62)), max_size=20),
       st.integers(0, 5))
def test_access_buffer(hits, misses):
    bufs = [core.AccessBuffer(10**9, 8) for core in (compiled, fallback)]
    for buf in bufs:
        for key, ns in hits:
            buf.hit(key, ns)
        for _ in range(misses):
            buf.miss(7)
    assert [len(b) for b in bufs][0] == [len(b) for b in bufs][1]
    assert bufs[0].due == bufs[1].due
    taken = [b.take() for b in bufs]
    assert taken[0] == taken[1]
    for buf, t in zip(bufs, taken):
        buf.hit(b"k" * 16, 3)
        buf.restore(t)
    assert bufs[0].take() == bufs[1].take()


def test_keep_set_is_shared():
    assert compiled.keep_set is fallback.keep_set


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 4), st.binary(max_size=300)), max_size=40),
       st.lists(st.integers(0, 40), max_size=5))
def test_c_reads_match_py_lmdb_reads(tmp_path_factory, records, dangling):
    """The compiled Reader's own LMDB path (get, contains, the dump) agrees with py-lmdb's on one file."""
    import os

    import lmdb
    import nvcache

    Cache = type("LayerCache_ext", (nvcache.LayerCache,), {"_core": compiled})
    with Cache(str(tmp_path_factory.mktemp("c")), 1) as cache:
        for i, when, data in records:  # few distinct times: many ties, broken by name
            cache.restore(f"sha256:{i}", data, reference_count=i, last_referred_ns=when * 10**9)
        store = cache._store
        reader = store.reader
        assert reader.direct and reader.fast
        txn = store.env.begin(write=True)  # lru entries without a record: both walks skip them
        for i in dangling:
            txn.put(b"\0" * 8 + os.urandom(16), b"", db=store.index.lru)
        txn.commit()
        with store.env.begin() as t:
            expected = store.index.cache_data(t)
            for i in range(42):
                key = compiled.name_key(f"sha256:{i}_layer_file".encode())
                assert reader.contains(key) == store.index.contains(t, key)
                assert reader.get(f"sha256:{i}", "layer_file") == store.index.lookup(t, key)
        assert reader.cache_data() == expected
        assert isinstance(store.env, lmdb.Environment)


ops = st.lists(st.one_of(
    # insert: record i, size, kept records, references, last reference (few distinct: ties)
    st.tuples(st.just("insert"), st.integers(0, 12), st.integers(0, 700), st.sets(st.integers(0, 12), max_size=4),
              st.integers(0, 3), st.integers(1, 3)),
    st.tuples(st.just("remove"), st.integers(0, 14)),
    # apply: buffered references (record, count, last reference), hits, misses
    st.tuples(st.just("apply"), st.lists(st.tuples(st.integers(0, 35), st.integers(1, 3), st.integers(1, 6)),
                                         max_size=6), st.integers(0, 3), st.integers(0, 3)),
), max_size=40)


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(500, 3000))
# Ties broken by name, not by key: sha256:3's key sorts before sha256:0's.
@example([("insert", i, 125, set(), 0, 1) for i in range(4)] + [("insert", 9, 125, set(), 0, 2)], 500)
@example([("insert", i, 125, set(), 0, 1) for i in range(4)] + [("insert", 9, 125, {0}, 0, 2)], 500)
def test_c_writes_match_py_lmdb_writes(tmp_path_factory, script, bound):
    """The compiled Writer's inserts, removes and applies (LMDB's C API) leave exactly the bytes that the
    same calls through py-lmdb transactions leave, with the same results and exceptions."""
    import nvcache

    Cache = type("LayerCache_ext", (nvcache.LayerCache,), {"_core": compiled})
    caches = [Cache(str(tmp_path_factory.mktemp("w")), bound / 1048576) for _ in range(2)]
    try:
        stores = [c._store for c in caches]
        assert stores[0].writer is not None and type(stores[0].writer) is compiled.Writer
        results = [[], []]
        for op in script:
            for n, store in enumerate(stores):
                txn = store.writer.begin() if n == 0 else store.env.begin(write=True)
                if op[0] == "insert":
                    _, i, size, keep, refs, when = op
                    name, lid = compiled.record_name(f"sha256:{i}", "layer_file")
                    data = bytes([i % 251]) * size
                    got = outcome(store.index.insert, txn, compiled.name_key(name), name, lid, data, bound,
                                  frozenset(f"sha256:{k}".encode() for k in keep), refs, when * 10**9)
                elif op[0] == "remove":
                    key = compiled.name_key(f"sha256:{op[1]}_layer_file".encode())
                    got = outcome(store.index.remove, txn, key)
                else:
                    _, entries, hits, misses = op
                    pending = {compiled.name_key(f"sha256:{i}_layer_file".encode()): [count, when * 10**9]
                               for i, count, when in entries}
                    got = outcome(store.index.apply, txn, pending, hits, misses)
                results[n].append(got)
                if got[0] == "ok":
                    txn.commit()
                else:
                    txn.abort()
        assert results[0] == results[1]
        contents = []
        for store in stores:
            with store.env.begin() as t:
                contents.append([list(t.cursor(db)) for db in (store.index.idx, store.index.dat,
                                                                store.index.lru, store.index.meta)
                                 ] + [store.index.counters(t)])
        assert contents[0][:3] == contents[1][:3]
        assert contents[0][4] == contents[1][4]
        meta = [[(k, v) for k, v in c[3] if k not in (b"boot", b"readers")] for c in contents]
        assert meta[0] == meta[1]
        assert caches[0].verify() == [] and caches[1].verify() == []
    finally:
        for c in caches:
            c.close()


def test_one_path_one_core_per_process(tmp_path):
    """The store of a path is shared in a process: a cache of the other core on it is refused."""
    ext = type("LayerCache_ext", (nvcache.LayerCache,), {"_core": compiled})
    twin = type("LayerCache_py", (nvcache.LayerCache,), {"_core": fallback})
    with ext(str(tmp_path), 1) as first:
        first.put("sha256:a", b"A")
        with pytest.raises(nvcache.CacheError, match="other core"):
            twin(str(tmp_path), 1)
        assert first.get("sha256:a") == b"A" and first.verify() == []
    with twin(str(tmp_path), 1) as again:  # once closed, the path is free for either core
        assert again.get("sha256:a") == b"A"


def _data_mappings(path):
    """Start addresses of this process's mappings of ``path``/data.mdb."""
    target = os.path.join(os.path.realpath(path), "data.mdb")
    with open("/proc/self/maps") as f:
        return {line.split("-", 1)[0] for line in f if line.rstrip("\n").endswith(" " + target)}


def test_compiled_reads_share_the_write_environment(tmp_path):
    """The compiled Reader reads through the Writer's environment, also after a rebuild.

    data.mdb is then mapped twice (py-lmdb's environment, which the cold paths
    use, and the compiled one), not three times.
    """
    ext = type("LayerCache_ext", (nvcache.LayerCache,), {"_core": compiled})
    with ext(str(tmp_path), 1) as cache:
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
