"""References for policies2.md: policies told, at each request, whether the layer is ever requested again
(dead records rank 0: evicted first), and the static popularity oracle (demo only). Not candidates."""
import sys; sys.path.insert(0, "bench")
import policies as P, policies2 as Q
from nvcache import simulate as sim
# References, not candidates: a policy told, at each request, whether the layer will be requested again
# (clock == request number in policies.simulate); dead records get rank 0 (evicted first).
def dead_oracle(base, reqs):
    last = {}
    for i, o in enumerate(reqs):
        last[o] = i + 1  # the clock value at the layer's last request
    class D(base):
        name = base.name + "+dead-oracle"
        def rank(self, obj, refs):
            r = base.rank(self, obj, refs)
            return 0 if last[obj] == self.clock else r
    return D
cells=[("demo",True,1.0),("burst",True,1.0),("demo",False,0.25),("burst",False,0.25)]
rec = Q.candidates()[Q.RECOMMENDED]
for tn,raw,f in cells:
    tr=P.measure(P.TRACES[tn](),raw=raw); cost=[P.cost_ns(n,500.,40.) for n in tr.record_sizes]
    reqs=tr.requests(); cap=int(P.DEMO_BOUND*f); tot=sum(tr.stored[i] for i in reqs)
    opt=sim.optimum_byte_hits(reqs,tr.stored,cap)/tot
    lru=P.simulate(P.LRU,tr,cap,cost).stored_bhr
    out=[]
    for c in (dead_oracle(P.LRU, reqs), dead_oracle(rec, reqs)):
        o=P.simulate(c,tr,cap,cost)
        out.append(f"{c.name} {100*o.stored_bhr:.2f} gap {100*(o.stored_bhr-lru)/(opt-lru):.0f}")
    orc = P.popularity_oracle(tr, cap) / tot if tn == "demo" else None
    print(tn, "raw" if raw else "zstd", f, f"LRU {100*lru:.2f} opt {100*opt:.2f}", out,
          f"popularity oracle {100*orc:.2f} gap {100*(orc-lru)/(opt-lru):.0f}" if orc else "", flush=True)
