"""Codec measurements for layer scan records: gzip (what the seed scanner stores) against zstd.

On ``record_set(N)`` (nvcache/scanrecords.py: scanner-shaped JSON, 59 B .. ~290 KB) and on an
incompressible set of the same sizes, for each codec and zstd frame layout (compact standard frame;
FORMAT_ZSTD1_MAGICLESS; the standard frame with its magic cut off): stored bytes and the ratio to
gzip, overall and per raw-size bucket; per-record compress and decompress times (each call timed
alone with ``perf_counter_ns``, GC off, the whole set walked ``--repeats`` times; a record's time is
the median of its repeats, then the median and mean over records); zstd dictionaries trained on
the first 200 / 500 / 1000 records and measured on held-out records; the bytes each frame layout
adds; and hot-path costs (creating a (de)compressor per call against reusing one), with a
thread-sharing and a fork probe in subprocesses.

gzip is ``gzip.compress(level 6, mtime=0)``: Go's compress/gzip default level is 6 and its
DefaultCompression writes the same 10-byte header and 8-byte trailer; the scanner's ``size`` is
that whole file. Go's deflate is its own implementation, so its bytes differ from zlib's by a few
per cent; zlib level 6 stands in for it here.

Run::

    .venv/bin/python bench/codecs.py --out bench/results/session6/codecs.json
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nvcache.scanrecords import incompressible_record, record_set  # noqa: E402

BUCKETS: List[Tuple[str, int, int]] = [("<256B", 0, 256), ("256B-2KiB", 256, 2048),
                                       ("2-16KiB", 2048, 16384), (">16KiB", 16384, 1 << 62)]
LEVELS = [1, 3, 6, 9, 12, 19]
DICT_SAMPLES = [200, 500, 1000]
DICT_KIB = [8, 16, 32, 64]
DICT_LEVELS = [1, 3, 6]
HELD_OUT_FROM = 1000  # every dictionary is measured on records[1000:], so all rows compare alike
MAGIC = b"\x28\xb5\x2f\xfd"
Codec = Tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def gzip_codec() -> Codec:
    return (lambda d: gzip.compress(d, 6, mtime=0)), (lambda f: zlib.decompress(f, 31))


def zstd_codec(level: int, layout: str = "compact", dict_data: Optional[zstandard.ZstdCompressionDict] = None) -> Codec:
    """The most compact frames: content size (needed to decompress one-shot), no checksum, no dict id.

    layout "compact": a standard frame; "magicless": FORMAT_ZSTD1_MAGICLESS through
    ZstdCompressionParameters.from_level (fixed parameters: zstd no longer adapts them to each
    record's size); "nomagic": the standard frame with its 4 magic bytes cut off, put back on read.
    """
    if layout == "magicless":
        params = zstandard.ZstdCompressionParameters.from_level(
            level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=1, write_checksum=0, write_dict_id=0)
        if dict_data is not None:
            dict_data = _dict_copy(dict_data)
            dict_data.precompute_compress(compression_params=params)
        cctx = zstandard.ZstdCompressor(compression_params=params, dict_data=dict_data)
        dctx = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS, dict_data=dict_data)
        return cctx.compress, dctx.decompress
    if dict_data is not None:
        dict_data = _dict_copy(dict_data)
        dict_data.precompute_compress(level=level)  # digested once, not at every call
    cctx = zstandard.ZstdCompressor(level=level, dict_data=dict_data, write_content_size=True,
                                    write_checksum=False, write_dict_id=False)
    dctx = zstandard.ZstdDecompressor(dict_data=dict_data)
    if layout == "nomagic":
        compress, decompress = cctx.compress, dctx.decompress
        return (lambda d: compress(d)[4:]), (lambda f: decompress(MAGIC + f))
    return cctx.compress, dctx.decompress


def _dict_copy(d: zstandard.ZstdCompressionDict) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(d.as_bytes())


def timed(fn: Callable[[bytes], bytes], items: Sequence[bytes], repeats: int) -> Tuple[List[bytes], List[float]]:
    """fn's outputs and, per item, the median over repeats of one call's time in µs."""
    clock = time.perf_counter_ns
    outs: List[bytes] = []
    rows: List[List[int]] = []
    gc.disable()
    try:
        for r in range(repeats):
            row = []
            for item in items:
                t0 = clock()
                out = fn(item)
                row.append(clock() - t0)
                if r == 0:
                    outs.append(out)
            rows.append(row)
    finally:
        gc.enable()
    return outs, [statistics.median(col) / 1000 for col in zip(*rows)]


def summary(us: Sequence[float]) -> Dict[str, float]:
    ordered = sorted(us)
    return {"median": round(statistics.median(ordered), 2), "mean": round(statistics.fmean(ordered), 2),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2)}


def bucket_of(size: int) -> str:
    return next(name for name, lo, hi in BUCKETS if lo <= size < hi)


def measure(name: str, codec: Codec, raws: Sequence[bytes], repeats: int, gz: Optional[Sequence[int]]) -> Dict[str, Any]:
    compress, decompress = codec
    frames, c_us = timed(compress, raws, repeats)
    backs, d_us = timed(decompress, frames, repeats)
    if any(b != r for b, r in zip(backs, raws)):
        raise AssertionError(f"{name}: a record did not round-trip")
    stored = [len(f) for f in frames]
    return describe(name, raws, stored, gz, c_us, d_us, repeats)


def describe(name: str, raws: Sequence[bytes], stored: Sequence[int], gz: Optional[Sequence[int]],
             c_us: Optional[Sequence[float]], d_us: Optional[Sequence[float]], repeats: int) -> Dict[str, Any]:
    raw_total, total = sum(map(len, raws)), sum(stored)
    out: Dict[str, Any] = {"codec": name, "records": len(raws), "raw_bytes": raw_total, "stored_bytes": total,
                           "raw_per_stored": round(raw_total / total, 3), "repeats": repeats, "stored": list(stored)}
    if gz is not None:
        out["vs_gzip"] = round(total / sum(gz), 4)
    buckets: Dict[str, Any] = {}
    for bname, lo, hi in BUCKETS:
        idx = [i for i, r in enumerate(raws) if lo <= len(r) < hi]
        if not idx:
            continue
        b: Dict[str, Any] = {"records": len(idx), "raw_bytes": sum(len(raws[i]) for i in idx),
                             "stored_bytes": sum(stored[i] for i in idx)}
        if gz is not None:
            b["vs_gzip"] = round(b["stored_bytes"] / sum(gz[i] for i in idx), 4)
        if c_us is not None and d_us is not None:
            b["compress_us_median"] = round(statistics.median(c_us[i] for i in idx), 2)
            b["decompress_us_median"] = round(statistics.median(d_us[i] for i in idx), 2)
        buckets[bname] = b
    out["buckets"] = buckets
    if c_us is not None and d_us is not None:
        out["compress_us"], out["decompress_us"] = summary(c_us), summary(d_us)
        out["compress_MBps"] = round(raw_total / sum(c_us), 1)
        out["decompress_MBps"] = round(raw_total / sum(d_us), 1)
    return out


def subset(result: Dict[str, Any], raws: Sequence[bytes], start: int, gz: Sequence[int]) -> Dict[str, Any]:
    """A whole-set result restricted to the held-out records (bytes only)."""
    return describe(result["codec"], raws[start:], result["stored"][start:], gz[start:], None, None, result["repeats"])


def run_corpus(label: str, raws: List[bytes], repeats: int, slow_repeats: int, log: Callable[[str], None]) -> Dict[str, Any]:
    res: Dict[str, Any] = {"label": label, "codecs": []}
    gzr = measure("gzip-6", gzip_codec(), raws, repeats, None)
    gz = gzr["stored"]
    gzr["vs_gzip"] = 1.0
    for b in gzr["buckets"].values():
        b["vs_gzip"] = 1.0
    res["codecs"].append(gzr)
    log(f"  {label} gzip-6: {gzr['stored_bytes']:,} B, c {gzr['compress_us']} d {gzr['decompress_us']}")
    for level in LEVELS:
        for layout in ("compact", "magicless", "nomagic"):
            name = f"zstd-{level}" + ("" if layout == "compact" else f"-{layout}")
            r = measure(name, zstd_codec(level, layout), raws, repeats if level < 12 else slow_repeats, gz)
            res["codecs"].append(r)
            log(f"  {label} {name}: {r['vs_gzip']} of gzip, c {r['compress_us']} d {r['decompress_us']}")
    return res


def train(samples: List[bytes], kib: int) -> Tuple[zstandard.ZstdCompressionDict, float]:
    t0 = time.perf_counter()
    d = zstandard.train_dictionary(kib * 1024, samples)
    return d, time.perf_counter() - t0


def run_dictionaries(raws: List[bytes], gz: List[int], repeats: int, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    held = raws[HELD_OUT_FROM:]
    rows = []
    for n in DICT_SAMPLES:
        for kib in DICT_KIB:
            d, seconds = train(raws[:n], kib)
            for level in DICT_LEVELS:
                r = measure(f"zstd-{level}+dict", zstd_codec(level, dict_data=d), held, repeats, gz[HELD_OUT_FROM:])
                magicless = zstd_codec(level, "magicless", d)
                stored_ml = [len(magicless[0](x)) for x in held]
                nomagic = r["stored_bytes"] - 4 * len(held)
                r.update({"samples": n, "dict_kib": kib, "dict_bytes": len(d.as_bytes()), "level": level,
                          "train_s": round(seconds, 3), "k": d.k, "d": d.d,
                          "magicless_stored_bytes": sum(stored_ml),
                          "magicless_vs_gzip": round(sum(stored_ml) / sum(gz[HELD_OUT_FROM:]), 4),
                          "nomagic_stored_bytes": nomagic, "nomagic_vs_gzip": round(nomagic / sum(gz[HELD_OUT_FROM:]), 4)})
                del r["stored"]
                rows.append(r)
                log(f"  dict {n} samples {kib} KiB L{level}: {r['vs_gzip']} of gzip (train {seconds:.2f} s), "
                    f"c {r['compress_us']} d {r['decompress_us']}")
    return rows


def frame_overhead(raws: List[bytes], d: zstandard.ZstdCompressionDict) -> Dict[str, Any]:
    """Bytes around the payload: empty-input frames, and the header sizes seen over the set."""
    def headers(cctx: zstandard.ZstdCompressor) -> Dict[str, float]:
        sizes = [zstandard.frame_header_size(cctx.compress(r)) for r in raws]
        return {"mean": round(statistics.fmean(sizes), 2), "min": min(sizes), "max": max(sizes)}
    compact = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False, write_dict_id=False)
    default = zstandard.ZstdCompressor(level=3)  # the package's defaults: content size and dict id, no checksum
    checked = zstandard.ZstdCompressor(level=3, write_checksum=True)  # as the zstd CLI writes
    with_id = zstandard.ZstdCompressor(level=3, dict_data=d)
    magicless = zstd_codec(3, "magicless")[0]
    empty = {"gzip (10 B header + 8 B trailer + empty deflate block)": len(gzip.compress(b"", 6, mtime=0)),
             "zstd compact (magic 4 + descriptor 1 + content size 1 + block header 3)": len(compact.compress(b"")),
             "zstd magicless": len(magicless(b"")), "zstd + checksum": len(checked.compress(b""))}
    sample = raws[:400]
    delta = {name: round(statistics.fmean(len(c(r)) - len(compact.compress(r)) for r in sample), 2)
             for name, c in (("package defaults (dict id only with a dict)", default.compress),
                             ("+ checksum", checked.compress), ("magicless", magicless))}
    delta["+ dict id (with a dictionary, vs the same dictionary without)"] = round(statistics.fmean(
        len(with_id.compress(r)) - len(zstd_codec(3, "compact", d)[0](r)) for r in sample), 2)
    return {"empty_input_frame_bytes": empty, "zstd_compact_header_bytes": headers(compact),
            "zstd_block_header_bytes": "3 per block of at most 128 KiB",
            "mean_bytes_vs_compact_zstd": delta}


def per_call(fn: Callable[[], Any], n: int) -> float:
    clock = time.perf_counter_ns
    samples = []
    gc.disable()
    try:
        for _ in range(n):
            t0 = clock()
            fn()
            samples.append(clock() - t0)
    finally:
        gc.enable()
    return round(statistics.median(samples) / 1000, 2)


def hot_path(raws: List[bytes], d: zstandard.ZstdCompressionDict, n: int) -> Dict[str, Any]:
    """µs per call (median of n): a put compresses one record, a get decompresses one."""
    picks = {}
    for target in (200, 2000, 60_000):
        picks[f"{target}B"] = min(raws, key=lambda r: abs(len(r) - target))
    out: Dict[str, Any] = {}
    for label, rec in picks.items():
        pre = _dict_copy(d)
        pre.precompute_compress(level=3)
        raw_dict = _dict_copy(d)
        reuse_c = zstandard.ZstdCompressor(level=3, write_checksum=False, write_dict_id=False)
        reuse_cd = zstandard.ZstdCompressor(level=3, dict_data=pre, write_dict_id=False)
        reuse_cd_raw = zstandard.ZstdCompressor(level=3, dict_data=raw_dict, write_dict_id=False)
        frame, dframe = reuse_c.compress(rec), reuse_cd.compress(rec)
        reuse_d, reuse_dd = zstandard.ZstdDecompressor(), zstandard.ZstdDecompressor(dict_data=pre)
        params = zstandard.ZstdCompressionParameters.from_level(3, format=zstandard.FORMAT_ZSTD1_MAGICLESS,
                                                                write_content_size=1, write_checksum=0, write_dict_id=0)
        out[label] = {"record_bytes": len(rec), "compress_us": {
            "reused ZstdCompressor": per_call(lambda: reuse_c.compress(rec), n),
            "new ZstdCompressor per call": per_call(lambda: zstandard.ZstdCompressor(level=3).compress(rec), n),
            "zstandard.compress() (new context per call)": per_call(lambda: zstandard.compress(rec, 3), n),
            "reused, magicless params (from_level without a size)": per_call(
                lambda c=zstandard.ZstdCompressor(compression_params=params): c.compress(rec), n),
            "reused + dict (precomputed)": per_call(lambda: reuse_cd.compress(rec), n),
            "reused + dict (not precomputed)": per_call(lambda: reuse_cd_raw.compress(rec), n),
            "new ZstdCompressor per call + precomputed dict": per_call(
                lambda: zstandard.ZstdCompressor(level=3, dict_data=pre).compress(rec), n),
            "new ZstdCompressor per call + dict not precomputed": per_call(
                lambda: zstandard.ZstdCompressor(level=3, dict_data=_dict_copy(d)).compress(rec), max(50, n // 10)),
            "gzip.compress level 6": per_call(lambda: gzip.compress(rec, 6, mtime=0), n),
        }, "decompress_us": {
            "reused ZstdDecompressor": per_call(lambda: reuse_d.decompress(frame), n),
            "new ZstdDecompressor per call": per_call(lambda: zstandard.ZstdDecompressor().decompress(frame), n),
            "reused + dict": per_call(lambda: reuse_dd.decompress(dframe), n),
            "new ZstdDecompressor per call + dict": per_call(
                lambda: zstandard.ZstdDecompressor(dict_data=pre).decompress(dframe), n),
            "gzip (zlib.decompress wbits=31)": per_call(lambda g=gzip.compress(rec, 6, mtime=0): zlib.decompress(g, 31), n),
        }}
    out["constructor_only_us"] = {
        "ZstdCompressor(level=3)": per_call(lambda: zstandard.ZstdCompressor(level=3), n),
        "ZstdDecompressor()": per_call(lambda: zstandard.ZstdDecompressor(), n),
        "ZstdCompressionParameters.from_level(3, magicless)": per_call(
            lambda: zstandard.ZstdCompressionParameters.from_level(3, format=zstandard.FORMAT_ZSTD1_MAGICLESS), n),
        "precompute_compress(level=3) of the dictionary": per_call(
            lambda: _dict_copy(d).precompute_compress(level=3), max(50, n // 10)),
    }
    out["context_memory_bytes"] = {f"ZstdCompressor(level={lv})": zstandard.ZstdCompressor(level=lv).memory_size()
                                   for lv in (1, 3, 6, 19)}
    out["context_memory_bytes"]["ZstdDecompressor()"] = zstandard.ZstdDecompressor().memory_size()
    used = zstandard.ZstdCompressor(level=3)
    used.compress(picks["60000B"])
    out["context_memory_bytes"]["ZstdCompressor(level=3) after a 60 KB record"] = used.memory_size()
    out["context_memory_bytes"]["ZstdCompressor(magicless from_level(3)), at creation"] = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(3, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    ).memory_size()
    return out


PROBE = textwrap.dedent('''
    import os, sys, threading, zstandard
    sys.path.insert(0, sys.argv[1])
    from nvcache.scanrecords import record_set
    raws = [r for _, r in record_set(300, seed=7)]
    shared = sys.argv[2] == "shared"
    cctx = zstandard.ZstdCompressor(level=3)
    bad, errors = [0], []
    def work(k):
        c = cctx if shared else zstandard.ZstdCompressor(level=3)
        d = zstandard.ZstdDecompressor()
        for i in range(int(sys.argv[3])):
            r = raws[(i * 7 + k) % len(raws)]
            try:
                if d.decompress(c.compress(r)) != r:
                    bad[0] += 1
            except Exception as exc:
                errors.append(type(exc).__name__ + ": " + str(exc)[:80])
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    if sys.argv[2] == "fork":  # a compressor made before fork, used in the child
        pid = os.fork()
        if pid == 0:
            ok = all(zstandard.ZstdDecompressor().decompress(cctx.compress(r)) == r for r in raws)
            os._exit(0 if ok else 3)
        bad[0] += os.waitpid(pid, 0)[1] != 0
    print(bad[0], len(errors), sorted(set(errors))[:3])
''')


def thread_probe(rounds: int) -> Dict[str, Any]:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = {}
    for mode in ("shared", "per-thread", "fork"):
        try:
            p = subprocess.run([sys.executable, "-c", PROBE, root, mode, str(rounds)], capture_output=True,
                               text=True, timeout=300)
            line = (p.stdout.strip().splitlines() or [""])[-1]
            out[mode] = {"returncode": p.returncode, "result": line, "stderr_tail": p.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            out[mode] = {"returncode": None, "result": "timed out"}
    return out


def markdown(doc: Dict[str, Any]) -> str:
    lines = [f"# Codec measurements ({doc['records']} scanner-shaped records, {doc['raw_bytes']:,} B raw)", "",
             f"zstandard {doc['env']['zstandard']} (libzstd {doc['env']['libzstd']}), Python {doc['env']['python']}, "
             f"load average {doc['loadavg_before']} before / {doc['loadavg_after']} after (2 cores, shared machine). "
             "µs are per record: each record's median over the repeats, then the median and mean over records. "
             "gzip = zlib level 6, mtime 0: the bytes the seed scanner counts (Go's compress/gzip, default level 6, "
             "writes the same 18-byte header and trailer; its deflate differs from zlib's by a few per cent).", ""]
    for corpus in doc["corpora"]:
        names = [b for b, _, _ in BUCKETS]
        lines += [f"## {corpus['label']}", "",
                  "| codec | stored B | vs gzip | " + " | ".join(f"{b} vs gzip" for b in names)
                  + " | compress µs med / mean | decompress µs med / mean |",
                  "|---" * (5 + len(names)) + "|"]
        for c in corpus["codecs"]:
            bs = " | ".join(str(c["buckets"].get(b, {}).get("vs_gzip", "-")) for b in names)
            lines.append(f"| {c['codec']} | {c['stored_bytes']:,} | {c['vs_gzip']} | {bs} | "
                         f"{c['compress_us']['median']} / {c['compress_us']['mean']} | "
                         f"{c['decompress_us']['median']} / {c['decompress_us']['mean']} |")
        counts = ", ".join(f"{b}: {corpus['codecs'][0]['buckets'][b]['records']}" for b in names
                           if b in corpus["codecs"][0]["buckets"])
        lines += ["", f"Records per bucket: {counts}.", ""]
    if doc.get("dictionaries"):
        held = doc["held_out_reference"]
        lines += [f"## Dictionaries (trained on the first N records, measured on records[{HELD_OUT_FROM}:])", "",
                  "vs gzip of the same held-out records; nomagic / magicless: those layouts with the same dictionary. "
                  "Rows 'none': no dictionary, same records.", "",
                  "| samples | dict KiB | level | vs gzip | nomagic | magicless | "
                  + " | ".join(f"{b}" for b, _, _ in BUCKETS)
                  + " | train s | compress µs med / mean | decompress µs med / mean |", "|---" * 13 + "|"]
        for name, h in held.items():
            bs = " | ".join(str(h["buckets"].get(b, "-")) for b, _, _ in BUCKETS)
            lines.append(f"| - | none | {name[5:]} | {h['vs_gzip']} | | | {bs} | | | |")
        for r in doc["dictionaries"]:
            bs = " | ".join(str(r["buckets"].get(b, {}).get("vs_gzip", "-")) for b, _, _ in BUCKETS)
            lines.append(f"| {r['samples']} | {r['dict_kib']} | {r['level']} | {r['vs_gzip']} | {r['nomagic_vs_gzip']} "
                         f"| {r['magicless_vs_gzip']} "
                         f"| {bs} | {r['train_s']} | {r['compress_us']['median']} / {r['compress_us']['mean']} | "
                         f"{r['decompress_us']['median']} / {r['decompress_us']['mean']} |")
        lines.append("")
    hp = doc["hot_path"]
    lines += ["## Hot path (µs per call, level 3, median)", ""]
    for op in ("compress_us", "decompress_us"):
        columns = list(hp["200B"][op])
        lines += ["| record | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|"]
        for label in ("200B", "2000B", "60000B"):
            lines.append(f"| {hp[label]['record_bytes']} B | " + " | ".join(str(hp[label][op][c]) for c in columns) + " |")
        lines.append("")
    lines += ["Constructors alone (µs): " + ", ".join(f"{k} {v}" for k, v in hp["constructor_only_us"].items()) + ".",
              "Context memory (bytes): " + ", ".join(f"{k} {v:,}" for k, v in hp["context_memory_bytes"].items()) + ".", "",
              "## Frame overhead", "", "```", json.dumps(doc["frame_overhead"], indent=2), "```", "",
              "## Sharing a compressor across threads / fork (probe in a subprocess)", "",
              "```", json.dumps(doc["thread_probe"], indent=2), "```", "", doc["thread_docs"], ""]
    return "\n".join(lines)


THREAD_DOCS = ("python-zstandard's docs (API Usage, 'Thread Safety'; ZstdCompressor and ZstdDecompressor pages): "
               "instances have no thread-safety guarantee; do not operate on one instance from different threads at "
               "the same time; calling a single instance from different threads is fine if the calls do not overlap; "
               "parallel operations need one instance each. The C extension releases the GIL during compression and "
               "decompression, so overlapping calls really are concurrent. Reusing an instance is faster than "
               "creating one per operation, most for small inputs. The docs say nothing about fork.")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/session6/codecs.json")
    ap.add_argument("-n", type=int, default=2000, help="records (the dictionary runs need more than 1000)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slow-repeats", type=int, default=2, help="repeats for zstd levels 12 and 19")
    ap.add_argument("--dict-repeats", type=int, default=3)
    ap.add_argument("--hot-calls", type=int, default=2000)
    ap.add_argument("--probe-rounds", type=int, default=3000)
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    pairs = record_set(args.n)
    ids, raws = [i for i, _ in pairs], [r for _, r in pairs]
    log(f"{len(raws)} records, {sum(map(len, raws)):,} B raw, generated in {time.perf_counter() - t0:.1f} s")
    noise = [incompressible_record(i, len(r)) for i, r in zip(ids, raws)]
    corpora = [run_corpus("scanner-shaped records", raws, args.repeats, args.slow_repeats, log),
               run_corpus("incompressible records (same sizes)", noise, args.repeats, args.slow_repeats, log)]
    gz = corpora[0]["codecs"][0]["stored"]
    held = {}
    for c in corpora[0]["codecs"]:
        if c["codec"] in ("zstd-1", "zstd-3", "zstd-6", "zstd-9", "zstd-19"):
            sub = subset(c, raws, HELD_OUT_FROM, gz)
            held[c["codec"]] = {"vs_gzip": sub["vs_gzip"], "buckets": {b: v["vs_gzip"] for b, v in sub["buckets"].items()}}
    dicts = run_dictionaries(raws, gz, args.dict_repeats, log) if len(raws) > HELD_OUT_FROM else []
    d32, _ = train(raws[:500], 32)
    log("frame overhead, hot path, thread probe ...")
    doc: Dict[str, Any] = {
        "records": len(raws), "raw_bytes": sum(map(len, raws)), "seed": 0,
        "env": {"python": platform.python_version(), "zstandard": zstandard.__version__,
                "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION)), "backend": zstandard.backend,
                "machine": platform.machine(), "cpus": os.cpu_count()},
        "method": {"timing": "perf_counter_ns around each call; GC disabled while timing; per record the median over "
                             "repeats; summaries over records", "gzip": "gzip.compress(level=6, mtime=0), decompressed "
                             "with zlib.decompress(wbits=31); size includes the 18-byte header and trailer as the "
                             "scanner's size does (Go compress/gzip default level 6)",
                   "zstd": "write_content_size=True, write_checksum=False, write_dict_id=False; magicless = "
                           "ZstdCompressionParameters.from_level(level, format=FORMAT_ZSTD1_MAGICLESS, ...) (fixed "
                           "parameters, not adapted to each record's size); nomagic = the standard frame minus its "
                           "4 magic bytes, restored before decompressing",
                   "dictionaries": f"train_dictionary(size, records[:N]) with the package defaults; measured on "
                                   f"records[{HELD_OUT_FROM}:] whatever N; dictionaries precomputed for the level",
                   "buckets": "by raw record size; vs_gzip = stored bytes / gzip bytes of the bucket's records"},
        "corpora": corpora, "held_out_reference": held, "dictionaries": dicts,
        "frame_overhead": frame_overhead(raws, d32), "hot_path": hot_path(raws, d32, args.hot_calls),
        "thread_probe": thread_probe(args.probe_rounds), "thread_docs": THREAD_DOCS,
    }
    doc["loadavg_before"], doc["loadavg_after"] = load_before, [round(x, 2) for x in os.getloadavg()]
    doc["elapsed_s"] = round(time.perf_counter() - t0, 1)
    for corpus in corpora:
        for c in corpus["codecs"]:
            c.pop("stored", None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(markdown(doc))
    log(f"wrote {args.out} and its .md in {doc['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
