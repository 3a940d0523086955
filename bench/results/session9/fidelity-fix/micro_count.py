import statistics, sys, tempfile, shutil, time
import nvcache
d = tempfile.mkdtemp(prefix="nvc-micro-")
try:
    c = nvcache.LayerCache(d, 4)
    c.put("sha256:a", b"x" * 2048)
    store = c._store
    buf = store.buffer
    buf.max_age_ns, buf.max_keys = 10**18, 10**9
    key, data, born = store.find("sha256:a", "layer_file")
    count, find, get = buf.count, store.reader.find, c.get
    def per_call(fn, n=200_000, reps=9):
        out = []
        for _ in range(reps):
            t = time.perf_counter_ns()
            for _ in range(n):
                fn()
            out.append((time.perf_counter_ns() - t) / n)
        return statistics.median(out)
    base = per_call(lambda: None)
    print("count(hit)  %.1f ns" % (per_call(lambda: count(key, data, born)) - base))
    print("count(miss) %.1f ns" % (per_call(lambda: count(key, None, 0)) - base))
    print("Reader.find %.1f ns" % (per_call(lambda: find("sha256:a", "layer_file")) - base))
    print("get(hit)    %.1f ns" % (per_call(lambda: get("sha256:a")) - base))
    c.close()
finally:
    shutil.rmtree(d)
