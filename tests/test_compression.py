"""Records are stored zstd-compressed, counted by stored bytes, and read back exactly as put.

Over both cores. The dictionary tests train on small JSON records shaped like a scanner's
(shared package names), for which a dictionary measurably helps.
"""

import json
import os
import random
import struct
import subprocess
import sys
import threading

import pytest

import nvcache.store

from nvcache import RecordTooLarge, codec, scanrecords
from payloads import incompressible

PACKAGES = [f"lib{name}{n}" for name in ("ssl", "curl", "xml", "yaml", "z", "ffi", "gcc", "c") for n in range(12)]


def package_list(i: int, count: int = 0) -> bytes:
    """A small record shaped like a scanner's: a package list drawn from a shared vocabulary."""
    rng = random.Random(i)
    pkgs = [{"name": rng.choice(PACKAGES), "version": f"{rng.randrange(9)}.{rng.randrange(30)}-r{rng.randrange(5)}",
             "source": "dpkg", "file": "var/lib/dpkg/status"} for _ in range(count or rng.randrange(1, 12))]
    return json.dumps({"layer": f"sha256:{i:064x}", "packages": pkgs}).encode()


def lid(i: int) -> str:
    return f"sha256:{i:064x}"


def encoding_of(cache, layer_id: str) -> int:
    """The encoding the core read for a record (0 raw, 1 zstd, n >= 2 zstd with dictionary n - 1)."""
    key = cache._core.record_key(layer_id, "layer_file")
    return cache._store.reader.lookup(key)[2]


def sizes(cache):
    return {r["layer_id"]: r["size"] for r in cache.cache_data()["cache_records"]}


def test_records_read_back_exactly_and_count_stored_bytes(make_cache):
    cache = make_cache(4)
    records = {lid(0): b"", lid(1): b"x", lid(2): package_list(2, 40), lid(3): incompressible(5000, 3),
               lid(4): b"ab" * 200_000, lid(5): incompressible(70_000, 5)}  # several chunks, raw and compressed
    for layer_id, data in records.items():
        assert cache.put(layer_id, memoryview(data) if layer_id == lid(2) else data)
    for layer_id, data in records.items():
        assert cache.get(layer_id) == data
        assert cache.peek(layer_id) == data
    assert cache.get_many(list(records)) == records
    got = sizes(cache)
    assert got[lid(2) + "_layer_file"] < len(records[lid(2)]) // 3  # compressed: the JSON shrinks
    assert got[lid(4) + "_layer_file"] < 1000
    for i in (0, 1, 3, 5):  # not smaller compressed: stored as given
        assert got[lid(i) + "_layer_file"] == len(records[lid(i)])
        assert encoding_of(cache, lid(i)) == codec.RAW
    assert encoding_of(cache, lid(2)) == encoding_of(cache, lid(4)) == 1
    assert cache.stats()["record_total_size"] == sum(got.values())
    assert cache.verify() == []


def test_compress_false_stores_raw_and_one_cache_holds_both(make_cache, cache_dir):
    zipped, raw = make_cache(4), make_cache(4, compress=False)
    data = package_list(7, 40)
    assert zipped.put(lid(1), data) and raw.put(lid(2), data)
    got = sizes(zipped)
    assert got[lid(2) + "_layer_file"] == len(data) > got[lid(1) + "_layer_file"]
    assert encoding_of(raw, lid(2)) == codec.RAW
    for cache in (zipped, raw):  # either handle reads either kind
        assert cache.get(lid(1)) == data and cache.get(lid(2)) == data
    with pytest.raises(TypeError, match="compress"):
        make_cache(4, compress=1)


def test_a_raw_record_is_laid_out_as_format_6_always_was(make_cache):
    """Records written before compression (format 6, all raw) stay readable: a raw record's chunk 0
    starts with the plain size, checksum and birth, and reads back through either core."""
    cache = make_cache(4, compress=False)
    data = package_list(3, 30)
    cache.put(lid(3), data)
    files = cache._store.files
    key = cache._core.record_key(lid(3), "layer_file")
    with files.env.begin() as txn:
        first = bytes(txn.get(key + b"\0\0\0\0", db=files.index.dat))
    size, check, _born = struct.unpack_from("<QQQ", first)
    assert (size, check) == (len(data), cache._core.checksum(data)) and first[24:] == data
    zipped = make_cache(4, path=cache.path)
    assert zipped.get(lid(3)) == data and encoding_of(zipped, lid(3)) == codec.RAW


def test_the_bound_is_on_stored_bytes(make_cache):
    cache = make_cache(0.01)  # 10,485 bytes
    big = b"layer " * 10_000  # 60,000 bytes put, a few hundred stored
    assert cache.put(lid(1), big)
    assert cache.get(lid(1)) == big
    with pytest.raises(RecordTooLarge, match="stored"):
        cache.put(lid(2), incompressible(11_000, 2))
    with pytest.raises(RecordTooLarge):  # an existing name does not hide a record that can never fit
        cache.put(lid(1), incompressible(11_000, 1))
    raw = make_cache(0.01, path=cache.path, compress=False)
    with pytest.raises(RecordTooLarge):
        raw.put(lid(3), big)
    assert len(cache) == 1 and cache.verify() == []
    # Eviction frees stored bytes: 30 compressible records of 60 KB fit where 1 raw one would not.
    for i in range(10, 40):
        assert cache.put(lid(i), (b"%d " % i) * 20_000)
    assert cache.stats()["record_total_size"] <= cache.max_bytes
    assert cache.evictions() == 0 and len(cache) == 31


def test_no_lock_is_held_while_compressing_or_decompressing(make_cache, monkeypatch):
    cache = make_cache(4)
    lock = cache._store.lock
    held = []
    encode, decode = codec.Codec.encode, codec.Codec.decode

    def watched_encode(self, data, number=None):
        held.append(("encode", lock.mutex._is_owned()))
        return encode(self, data, number)

    def watched_decode(self, enc, stored, load=None):
        held.append(("decode", lock.mutex._is_owned()))
        return decode(self, enc, stored, load)
    monkeypatch.setattr(codec.Codec, "encode", watched_encode)
    monkeypatch.setattr(codec.Codec, "decode", watched_decode)
    data = package_list(1, 30)
    assert cache.put(lid(1), data)
    assert cache.get(lid(1)) == data and cache.get_many([lid(1)]) == {lid(1): data}
    assert [what for what, _ in held] == ["encode", "decode", "decode"]
    assert not any(locked for _, locked in held)


def _train(cache, start=1000, n=400):
    return cache.train_dictionary(package_list(i) for i in range(start, start + n))


def test_a_dictionary_makes_small_records_smaller_and_every_process_reads_them(make_cache, core_env):
    cache = make_cache(16)
    small = [package_list(i) for i in range(60)]
    plain = codec.stored_sizes(small)
    assert _train(cache) == 1
    for i, data in enumerate(small):
        assert cache.put(lid(i), data)
    assert all(encoding_of(cache, lid(i)) == 2 for i in range(60))
    stored = sum(sizes(cache).values())
    assert stored < 0.8 * sum(plain), (stored, sum(plain))
    assert all(cache.get(lid(i)) == small[i] for i in range(60))
    # Another process: learns dictionary 1 from the file, reads the records, and puts with it too.
    prog = ("import json, sys, nvcache; c = nvcache.LayerCache(sys.argv[1], 16)\n"
            "print(json.dumps([c.get('sha256:%064x' % i).decode() for i in range(60)]))\n"
            "c.put('sha256:%064x' % 99, sys.argv[2].encode()); c.close()")
    out = subprocess.run([sys.executable, "-c", prog, cache.path, package_list(99).decode()], env=core_env,
                         capture_output=True, text=True, check=True)
    assert [s.encode() for s in json.loads(out.stdout)] == small
    assert encoding_of(cache, lid(99)) == 2 and cache.get(lid(99)) == package_list(99)
    assert cache.verify() == []


def test_a_process_adopts_another_processes_new_dictionary_at_its_next_put(make_cache, core_env):
    """A process whose cache had no dictionary when it opened adopts one another process trained
    since at its next put (each put reads the file's current number in its transaction; the
    record was compressed before it, so the puts after it use the dictionary), not at its own
    REFRESH_EVERY-th: in a fresh cache every other process would otherwise store its next
    hundreds of records without it (bench/fidelity.py measured 906 against 656 bytes a record)."""
    prog = ("import sys, nvcache; c = nvcache.LayerCache(sys.argv[1], 16)\n"
            "c.put('sha256:%064x' % 1000, b'before the dictionary'); print('ready', flush=True)\n"
            "sys.stdin.readline(); c.put('sha256:%064x' % 99, sys.argv[2].encode())\n"
            "c.put('sha256:%064x' % 98, sys.argv[3].encode()); c.close()")
    cache = make_cache(16)
    peer = subprocess.Popen([sys.executable, "-c", prog, cache.path, package_list(99).decode(),
                             package_list(98).decode()], env=core_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "ready"
        assert _train(cache) == 1  # after the peer's first put, long before its 256th
        peer.communicate("go\n", timeout=60)
        assert peer.returncode == 0
    finally:
        if peer.poll() is None:
            peer.kill()
    assert encoding_of(cache, lid(99)) == 1  # compressed before its transaction read the number
    assert encoding_of(cache, lid(98)) == 2 and cache.get(lid(98)) == package_list(98)
    assert cache.get(lid(99)) == package_list(99) and cache.verify() == []


def test_records_made_with_an_older_dictionary_stay_readable(make_cache):
    cache = make_cache(16)
    assert _train(cache, 1000) == 1
    old = {lid(i): package_list(i) for i in range(20)}
    for layer_id, data in old.items():
        cache.put(layer_id, data)
    # A newer dictionary is kept only if it saves bytes: train it on records of another shape.
    other = [json.dumps({"files": [f"/usr/share/doc/{p}/copyright" for p in random.Random(i).sample(PACKAGES, 20)],
                         "secrets": []}).encode() for i in range(400)]
    assert cache.train_dictionary(other) == 2
    cache.put(lid(100), other[0])
    assert encoding_of(cache, lid(100)) == 3 and encoding_of(cache, lid(0)) == 2
    assert all(cache.get(k) == v for k, v in old.items()) and cache.get(lid(100)) == other[0]
    assert cache.verify() == []


def test_a_dictionary_that_saves_nothing_is_not_stored(make_cache):
    cache = make_cache(16)
    assert cache.train_dictionary(incompressible(3000, i) for i in range(300)) == 0
    assert cache.train_dictionary([]) == 0


def test_a_damaged_dictionary_makes_its_records_misses_never_wrong_bytes(make_cache, core_env):
    cache = make_cache(16)
    assert _train(cache) == 1
    data = package_list(5, 20)
    cache.put(lid(5), data)
    cache.put(lid(6), incompressible(300, 6))  # raw: not affected
    store = cache._store
    with store.files.env.begin(write=True) as txn:  # flip one byte of dictionary 1
        key = b"dict\0\1"
        raw = bytearray(txn.get(key, db=store.files.meta_db))
        raw[100] ^= 0xFF
        txn.put(key, bytes(raw), db=store.files.meta_db)
    assert any("dictionary 1" in p for p in cache.verify())
    # A process that never loaded dictionary 1: the record it cannot decode is a miss, and dropped.
    prog = ("import sys, nvcache; c = nvcache.LayerCache(sys.argv[1], 16)\n"
            "print(c.get('sha256:%064x' % 5), len(c.get('sha256:%064x' % 6)), len(c)); c.close()")
    out = subprocess.run([sys.executable, "-c", prog, cache.path], env=core_env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["None", "300", "1"]
    assert "could not be decoded); dropped it" in out.stderr
    assert cache.get(lid(5)) is None and cache.get(lid(6)) == incompressible(300, 6)
    assert cache.verify() == []


def test_threads_share_a_codec_safely(make_cache):
    cache = make_cache(64)  # room for everything: every get must find what its thread put
    assert _train(cache) == 1
    wrong = []

    def work(t: int) -> None:
        for i in range(200):
            n = t * 1000 + i
            data = package_list(n, 1 + n % 30)
            cache.put(lid(n), data)
            if cache.get(lid(n)) != data:
                wrong.append(n)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and len(cache) == 800 and cache.verify() == []


def test_a_growing_cache_trains_its_first_dictionary_itself(make_cache, monkeypatch):
    monkeypatch.setattr(codec, "TRAIN_AT", 300)
    monkeypatch.setattr(nvcache.store, "REFRESH_EVERY", 50)
    cache = make_cache(16)
    for i in range(400):
        cache.put(lid(i), package_list(i))
    assert cache._store.reader.codec.current == 1
    assert encoding_of(cache, lid(399)) == 2 and encoding_of(cache, lid(0)) == 1
    assert all(cache.get(lid(i)) == package_list(i) for i in range(400))
    assert os.path.isdir(cache.path) and cache.verify() == []
    assert _trainings(cache) == 1


def _trainings(cache) -> int:
    files = cache._store.files
    with files.env.begin() as txn:
        return files.index.trainings(txn)


def test_each_generation_is_trained_once_per_cache_even_when_useless(make_cache, monkeypatch, core_env):
    """Records no dictionary helps: the first process to find a generation due claims it, its
    dictionary is refused, and no other process (nor itself) tries that generation again."""
    monkeypatch.setattr(codec, "TRAIN_AT", 100)
    monkeypatch.setattr(nvcache.store, "REFRESH_EVERY", 50)
    trained = []
    train = codec.train
    monkeypatch.setattr(nvcache.store, "train", lambda *a: trained.append(1) or train(*a))
    cache = make_cache(64)
    for i in range(350):  # due at 100 (claimed, refused); the next at 400
        cache.put(lid(i), incompressible(500, i))
    assert trained == [1] and _trainings(cache) == 1 and cache._store.reader.codec.current == 0
    # Another process at 350 records and TRAIN_AT 100 would train again if it did not read the claim.
    prog = ("import sys, nvcache, nvcache.codec as c, nvcache.store as s\n"
            "c.TRAIN_AT = 100; s.REFRESH_EVERY = 10\n"
            "calls = []; t = s.train; s.train = lambda *a: calls.append(1) or t(*a)\n"
            "cache = nvcache.LayerCache(sys.argv[1], 64)\n"
            "for i in range(20): cache.put('sha256:x%d' % i, bytes(range(256)) * 2)\n"
            "print(len(calls)); cache.close()")
    out = subprocess.run([sys.executable, "-c", prog, cache.path], env=core_env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["0"]
    assert _trainings(cache) == 1


def test_an_unusable_dictionary_is_refused_and_a_failing_training_fails_no_put(make_cache, monkeypatch, caplog):
    cache = make_cache(16)
    junk = b"\x37\xa4\x30\xec" + bytes(range(256)) * 8  # zstd's dictionary magic, then nonsense
    with pytest.raises(ValueError, match="dictionary"):
        cache.add_dictionary(junk)
    with pytest.raises(TypeError):
        cache.add_dictionary("not bytes")  # type: ignore[arg-type]
    assert cache._store.reader.codec.current == 0
    monkeypatch.setattr(codec, "TRAIN_AT", 50)
    monkeypatch.setattr(nvcache.store, "REFRESH_EVERY", 20)

    def broken(*_args):
        raise MemoryError("no room to train")
    monkeypatch.setattr(nvcache.store, "train", broken)
    with caplog.at_level("WARNING", logger="nvcache"):
        for i in range(100):
            assert cache.put(lid(i), package_list(i))
    assert "training a compression dictionary" in caplog.text and "MemoryError" in caplog.text
    assert all(cache.get(lid(i)) == package_list(i) for i in range(100)) and cache.verify() == []


def test_a_put_compressed_for_files_replaced_since_is_encoded_again(make_cache):
    """The store encodes before its lock; if the files it encoded for were replaced meanwhile, the
    dictionary numbers may mean other dictionaries: the write encodes again, without one."""
    cache = make_cache(16)
    other = make_cache(16, path=cache.path + "-other")
    assert _train(other, 3000) == 1
    data = package_list(9, 25)
    enc, stored = other._store.reader.codec.encode(data)
    assert enc == 2  # with the other file's dictionary 1, which this file does not have
    store = cache._store
    name, n = cache._core.record_name(lid(9), "layer_file")
    key = cache._core.name_key(name)
    assert store._write(store._insert, key, name, n, data, enc, stored, other._store.reader.codec,
                        frozenset(), 0, 0) == 0
    assert encoding_of(cache, lid(9)) == 1 and cache.get(lid(9)) == data and cache.verify() == []


def test_an_import_stores_records_at_the_sizes_it_measured(make_cache, monkeypatch, tmp_path):
    """No dictionary is trained while an import restores, even past the points where puts would
    train one, so its records take the stored sizes its fit check measured, and nothing is evicted."""
    from nvcache import seedfmt
    from test_seedfmt import build_seed
    monkeypatch.setattr(codec, "TRAIN_AT", 50)
    monkeypatch.setattr(nvcache.store, "REFRESH_EVERY", 20)
    cache = make_cache(64)
    raw = make_cache(64, path=cache.path, compress=False)
    for i in range(300):
        raw.put(lid(100_000 + i), package_list(i))
    held = cache.stats()["record_total_size"]
    records = scanrecords.record_set(400, seed=9)
    src = str(tmp_path / "seed")
    build_seed(src, [(l, d, 1, "2024-01-01T00:00:00Z") for l, d in records], hits=0, misses=0)
    result = seedfmt.import_seed(src, cache)
    assert result.imported == 400 and result.dictionary is not None
    assert cache.stats()["record_total_size"] == held + result.record_bytes
    assert cache.evictions() == 0 and _trainings(cache) == 1  # the import's dictionary counts as one
