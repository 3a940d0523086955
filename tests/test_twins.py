"""The compiled index and its pure-Python twin agree function by function (hypothesis)."""

from hypothesis import given, settings
from hypothesis import strategies as st

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
