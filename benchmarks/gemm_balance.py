"""Split of the int8 grouped GEMM's work between 2 threads (contiguous task ranges), expert-major vs tile-major."""
import sys
import numpy as np
from moec.runtime.session import BundleSession
s = BundleSession(sys.argv[1], threads=1)
n = int(sys.argv[2])
s.prefill([3 + i % 97 for i in range(8)]); s.reset()
offs = []
def hook(func, sym, before, ret, *a):
    if before and sym.startswith("gemm_") and "_s64_" in sym:
        offs.append(a[5].numpy().copy())
    return 0
s.vm.set_instrument(hook)
s.prefill([3 + i % 97 for i in range(n)])
s.vm.set_instrument(None) if False else None
tiles = int(sys.argv[3]) if len(sys.argv) > 3 else 16
for threads in (2,):
    eff = {"expert-major": [], "tile-major": []}
    for o in offs:
        counts = np.diff(o)
        cost_e = np.repeat(np.ceil(counts / 4), tiles)          # task = e * tiles + t
        cost_t = np.tile(np.ceil(counts / 4), tiles)            # task = t * experts + e
        for name, c in (("expert-major", cost_e), ("tile-major", cost_t)):
            step = -(-len(c) // threads)
            parts = [c[i * step:(i + 1) * step].sum() for i in range(threads)]
            eff[name].append(c.sum() / threads / max(parts))
    for name, v in eff.items():
        print(f"{n} tokens, {len(offs)} expert GEMM calls, {threads} threads, {name}: parallel efficiency "
              f"median {np.median(v):.3f} min {min(v):.3f} (1 = even split)")
