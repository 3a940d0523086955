"""The deep consistency check of the index (``Index.check``, both cores: the compiled one forwards).

Cold code over fallback.py's layout and walk: every index entry against its
bytes, birth, LRU entry and the totals.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import xxhash

from .fallback import (_CHUNK, _HDR, _TS, HEADER_SIZE, KEY_SIZE, RANK_SIZE, chunk_count, read_prefix,
                       read_record)


def check_index(index: Any, txn: Any, max_bytes: Optional[int]) -> List[str]:
    """Every inconsistency between index, records, LRU order, checksums and totals."""
    problems: List[str] = []
    count = total = 0
    expected = set()
    with txn.cursor(index.idx) as cur:
        for key, hdr in cur:
            if len(key) != KEY_SIZE or len(hdr) <= HEADER_SIZE:
                problems.append(f"index entry {key.hex()} is malformed")
                continue
            size, _refs, _last, check, born, rank, lid = _HDR.unpack_from(hdr)
            name = hdr[HEADER_SIZE:]
            label = name.decode("ascii", "replace")
            if xxhash.xxh3_128_digest(name) != key:
                problems.append(f"record {label}: key does not match its name")
            if not 1 <= lid < len(name):
                problems.append(f"record {label}: bad layer_id length {lid}")
            prefix = read_prefix(txn, index.dat, key)
            data = read_record(txn, index.dat, key)[0]
            if data is None:
                problems.append(f"record {label}: bytes are missing")
            elif prefix is None:
                problems.append(f"record {label}: first chunk too short for its size, checksum and birth")
            elif prefix[:3] != (size, check, born):
                problems.append(f"record {label}: stored size/checksum/birth {prefix[:3]} != indexed "
                                f"{(size, check, born)}")
            elif data is False:
                problems.append(f"record {label}: checksum mismatch (or a missing or short chunk)")
            elif prefix[3] > 1 and index.dictionary(txn, prefix[3] - 1) is None:
                problems.append(f"record {label}: compressed with dictionary {prefix[3] - 1}, which is "
                                "missing or damaged")
            expected.add(_TS.pack(rank) + key)
            count += 1
            total += size

    def seen(group: List[Tuple[bytes, bytes]]) -> None:
        for lk, _hdr in group:
            if lk in expected:
                expected.discard(lk)
            else:  # a record's entry at another rank (or a second one)
                problems.append(f"lru entry {lk.hex()} has no matching record")
    index.walk(txn, seen, lambda lk: problems.append(f"lru entry {lk.hex()} has no matching record"))
    for lk in sorted(expected):
        problems.append(f"record key {lk[RANK_SIZE:].hex()} is missing from the lru order")
    with txn.cursor(index.dat) as cur:
        for ckey in cur.iternext(keys=True, values=False):
            hdr = txn.get(ckey[:KEY_SIZE], None, index.idx) if len(ckey) == KEY_SIZE + 4 else None
            if hdr is None or len(hdr) <= HEADER_SIZE:
                problems.append(f"record bytes {ckey.hex()} have no index entry")
            elif _CHUNK.unpack_from(ckey, KEY_SIZE)[0] >= chunk_count(_HDR.unpack_from(hdr)[0]):
                problems.append(f"record bytes {ckey.hex()}: a chunk beyond the record's size")
    stored_count, stored_total = index.counters(txn)[:2]  # all three counters must parse
    if stored_count != count:
        problems.append(f"record_count {stored_count} != {count} records present")
    if stored_total != total:
        problems.append(f"record_total_size {stored_total} != {total} bytes present")
    if max_bytes is not None and total > max_bytes:
        problems.append(f"record_total_size {total} is above the bound {max_bytes}")
    return problems
