"""Decode-GEMV effective bandwidth per bit class vs. the machine's read bandwidth and onnxruntime MatMulNBits.

Effective bandwidth = bytes of the *selected* experts' canonical packed weights + fp16 scales +
packed zeros (``packed_nbytes``) per call / time per call. "Hot": the same experts every call
(they stay in cache). "Cold": a stack of experts totalling more than ``--cold-gb`` GB, the
selected experts rotating so each call reads weights evicted since their last use.
onnxruntime runs one ``MatMulNBits`` node per expert (accuracy_level 0 = float32 activations,
4 = int8 activations) on the same shapes: hot = a graph of ``top_k`` nodes run repeatedly (the
same per-call Python overhead as one moec call), cold = a graph of one node per expert of a
> ``--cold-gb`` GB stack; both timed per node. Ratio = ORT time / moec time
(> 1: moec faster).

Usage: ``python benchmarks/kernel_bandwidth.py [--threads 2] [--bits 2,3,4,8,16,32]``
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("kernel_bandwidth")


def best_time(fn, repeat: int, number: int = 1) -> float:
    """Best of ``repeat`` timings of ``number`` calls of ``fn``, in seconds per call."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


# ---------------------------------------------------------------------------------------------
# Machine read bandwidth
# ---------------------------------------------------------------------------------------------

def _tvm_sum_kernel(rows: int, cols: int, streams: int):
    """A parallel, vectorised float32 sum reading ``streams`` rows at once per task.

    The read-bandwidth probe at its most efficient: several concurrent sequential streams per
    thread keep more DRAM requests in flight than one.
    """
    import tvm
    from tvm.script import tirx as T

    from moec.lower.kernels.factory import host_target

    tasks = rows // streams

    @T.prim_func
    def rsum(a: T.Buffer((rows, cols), "float32"), out: T.Buffer((tasks, 16), "float32")):
        T.func_attr({"global_symbol": "rsum", "tirx.noalias": True})
        for p in T.parallel(tasks):
            acc = T.alloc_buffer((streams, 4, 16), "float32", scope="local")
            for s, u in T.grid(streams, 4):
                for lane in T.vectorized(16):
                    acc[s, u, lane] = T.float32(0)
            for i in range(cols // 64):
                for s in T.unroll(streams):
                    for u in T.unroll(4):
                        for lane in T.vectorized(16):
                            acc[s, u, lane] = acc[s, u, lane] + a[p * streams + s, i * 64 + u * 16 + lane]
            for lane in T.vectorized(16):
                out[p, lane] = T.float32(0)
            for s, u in T.grid(streams, 4):
                for lane in T.vectorized(16):
                    out[p, lane] = out[p, lane] + acc[s, u, lane]

    return tvm.compile(tvm.IRModule({"rsum": rsum}), target=host_target())["rsum"]


def read_bandwidth(nbytes: int, threads: int, repeat: int) -> dict[str, float]:
    """GB/s of reading an ``nbytes`` float32 array: numpy sum (1 and ``threads`` threads), TVM sums."""
    import tvm

    n = nbytes // 4
    rows = threads * 8
    cols = (n // rows) // 64 * 64
    a = np.random.default_rng(0).random(rows * cols, dtype=np.float32).reshape(rows, cols)
    size = a.nbytes
    out = {"numpy 1 thread": size / best_time(lambda: a.sum(), repeat) / 1e9}
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:  # numpy reductions release the GIL
        out[f"numpy {threads} threads"] = size / best_time(
            lambda: list(pool.map(np.sum, parts)), repeat) / 1e9
    ta = tvm.runtime.tensor(a)
    for streams in (1, 2, 4):
        fn = _tvm_sum_kernel(rows, cols, streams)
        tout = tvm.runtime.empty((rows // streams, 16), "float32", tvm.cpu())
        fn(ta, tout)
        out[f"tvm sum {threads} threads x {streams} streams"] = size / best_time(
            lambda: fn(ta, tout), repeat) / 1e9
    return out


# ---------------------------------------------------------------------------------------------
# moec GEMV
# ---------------------------------------------------------------------------------------------

def expert_nbytes(bits: int, n: int, k: int, gs: int) -> int:
    """Canonical bytes of one expert weight (what a call must read)."""
    from moec.quant.pack import packed_nbytes
    if bits == 32:
        return n * k * 4
    return packed_nbytes(n, k, bits, gs)["total"]


def random_stack(bits: int, n: int, k: int, gs: int, experts: int, tile: int, seed: int = 0):
    """Random kernel-layout arrays of ``experts`` experts (bandwidth does not depend on values).

    Drawn per row, then cut into ``tile``-row tiles as ``to_kernel_layout`` does (``tile`` divides
    ``n``, as ``kernel_tile`` picks it), so one seed gives the same weights at every tile and layouts
    can be compared bit for bit (``gemv_variants.py`` with a ``layout_tile`` variant)."""
    from moec.lower.kernels.layout import zero_words
    if n % tile:
        raise SystemExit(f"tile {tile} does not divide N = {n}")
    rng = np.random.default_rng(seed)

    def tiled(rows):  # [experts, n, c] -> [experts, n / tile, c, tile]
        return np.ascontiguousarray(rows.reshape(experts, n // tile, tile, -1).transpose(0, 1, 3, 2))

    if bits in (16, 32):
        dtype = np.float16 if bits == 16 else np.float32
        return [tiled(rng.standard_normal((experts, n, k), dtype=np.float32).astype(dtype))]
    groups = k // gs
    words = rng.integers(0, 2**32, (experts, n, k * bits // 32), dtype=np.uint32)
    scale = (rng.random((experts, n, groups), dtype=np.float32) * 0.01 + 1e-3).astype(np.float16)
    zero = rng.integers(0, 2**32, (experts, n, zero_words(groups, bits)), dtype=np.uint32)
    return [tiled(words), tiled(scale), tiled(zero)]


def time_gemv(bits: int, n: int, k: int, gs: int, experts: int, top_k: int, rotate: bool,
              repeat: int, activations: str = "float32") -> float:
    """Seconds per GEMV call over ``top_k`` experts of an ``experts`` stack."""
    import tvm

    from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv
    from moec.lower.schedules import kernel_tile

    target = host_target()
    fn = compile_kernel(make_gemv(bits, n, k, gs, experts, top_k, target, activations=activations),
                        target)["gemv"]
    dev = tvm.cpu()
    weights = [tvm.runtime.tensor(a, dev) for a in random_stack(bits, n, k, gs, experts,
                                                                kernel_tile(target, n, bits, activations))]
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, k)).astype(np.float32), dev)
    y = tvm.runtime.empty((top_k, n), "float32", dev)
    calls = max(1, experts // top_k) if rotate else 1
    ids = [tvm.runtime.tensor((np.arange(top_k) + c * top_k).astype(np.int32) % experts, dev)
           for c in range(calls)]
    state = {"c": 0}

    def one():
        fn(x, *weights, ids[state["c"]], y)
        state["c"] = (state["c"] + 1) % calls

    for _ in range(3):
        one()
    if rotate:  # one pass over the whole stack per timing: every expert is cold when read
        return best_time(lambda: [one() for _ in range(calls)], repeat) / calls
    return best_time(one, repeat, number=50)


# ---------------------------------------------------------------------------------------------
# onnxruntime MatMulNBits
# ---------------------------------------------------------------------------------------------

def ort_session(bits: int, n: int, k: int, gs: int, nodes: int, accuracy: int, threads: int):
    """A session with ``nodes`` MatMulNBits nodes (one expert each) sharing input ``A [1, K]``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    blocks = k // gs
    inits, outs, graph_nodes = [], [], []
    for e in range(nodes):
        b = rng.integers(0, 256, (n, blocks, gs * bits // 8), dtype=np.uint8)
        scales = (rng.random((n, blocks), dtype=np.float32) * 0.01 + 1e-3)
        zp = rng.integers(0, 256, (n * -(-blocks * bits // 8),), dtype=np.uint8)
        inits += [numpy_helper.from_array(b, f"B{e}"), numpy_helper.from_array(scales, f"S{e}"),
                  numpy_helper.from_array(zp, f"Z{e}")]
        graph_nodes.append(helper.make_node(
            "MatMulNBits", ["A", f"B{e}", f"S{e}", f"Z{e}"], [f"Y{e}"], domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=gs, accuracy_level=accuracy))
        outs.append(helper.make_tensor_value_info(f"Y{e}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(graph_nodes, "experts",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_ort(bits: int, n: int, k: int, gs: int, nodes: int, accuracy: int, threads: int,
             repeat: int, hot: bool) -> float:
    """Seconds per MatMulNBits node (one expert GEMV); ``hot``: the same nodes run repeatedly."""
    sess = ort_session(bits, n, k, gs, nodes, accuracy, threads)
    feed = {"A": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    t0 = time.perf_counter()
    sess.run(None, feed)
    first = time.perf_counter() - t0
    if first > 5.0:  # a compute-bound fallback path (e.g. 2 bits at level 0): one more run is plenty
        return min(first, best_time(lambda: sess.run(None, feed), 1)) / nodes
    number = 20 if hot else 1
    return best_time(lambda: sess.run(None, feed), repeat, number) / nodes


def check_same_numerics(bits: int = 4, n: int = 64, k: int = 256, gs: int = 64) -> float:
    """Max |moec - ORT| / max|ORT| of one expert through both, from the same packed bytes.

    Guards the comparison: moec's packed layout *is* MatMulNBits' (``moec.quant.pack``).
    """
    import onnxruntime as ort
    import tvm
    from onnx import TensorProto, helper, numpy_helper

    from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv
    from moec.lower.kernels.layout import to_kernel_layout
    from moec.lower.schedules import kernel_tile
    from moec.quant.packed_model import pack_weight

    rng = np.random.default_rng(3)
    pw = pack_weight(rng.standard_normal((n, k)).astype(np.float32), bits, gs)
    x = rng.standard_normal((1, k)).astype(np.float32)
    inits = [numpy_helper.from_array(pw.packed.reshape(n, k // gs, gs * bits // 8), "B"),
             numpy_helper.from_array(pw.scale.astype(np.float32), "S"),
             numpy_helper.from_array(pw.zero.reshape(-1), "Z")]
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=gs, accuracy_level=0)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"A": x})
    target = host_target()
    lay = to_kernel_layout(pw, kernel_tile(target, n, bits, "float32"))
    fn = compile_kernel(make_gemv(bits, n, k, gs, 1, 1, target), target)["gemv"]
    args = [tvm.runtime.tensor(a) for a in (x, lay["weight"][None], lay["scale"][None], lay["zero"][None],
                                            np.zeros(1, np.int32), np.zeros((1, n), np.float32))]
    fn(*args)
    return float(np.abs(args[-1].numpy() - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", default="2,3,4,8,16,32")
    ap.add_argument("--n", type=int, default=2048, help="out_features of the cold experts")
    ap.add_argument("--k", type=int, default=2048, help="in_features of the cold experts")
    ap.add_argument("--hot-n", type=int, default=1024)
    ap.add_argument("--hot-k", type=int, default=1024)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--cold-gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-ort", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log.warning("load average %.1f: other processes are running, timings will be low", load_before)

    if not args.no_ort:
        log.info("moec vs ORT MatMulNBits on the same packed weight: max rel diff %.1e",
                 check_same_numerics())
    dram = read_bandwidth(int(args.cold_gb * 1e9), args.threads, args.repeat)
    cache = read_bandwidth(1 << 20, args.threads, args.repeat * 20)
    dram_bw, cache_bw = max(dram.values()), max(cache.values())
    for name, d in (("DRAM (%.1f GB)" % args.cold_gb, dram), ("cache (1 MiB)", cache)):
        log.info("read bandwidth %s: %s", name, ", ".join(f"{m} {v:.1f} GB/s" for m, v in d.items()))

    gs, top_k = args.group_size, args.top_k
    shapes = {"hot": (args.hot_n, args.hot_k), "cold": (args.n, args.k)}
    results: dict[tuple[int, str, str], float] = {}  # (bits, impl, mode) -> seconds per expert
    for bits in (int(b) for b in args.bits.split(",")):
        for mode, (n, k) in shapes.items():
            per_expert = expert_nbytes(bits, n, k, gs)
            experts = top_k if mode == "hot" else max(2 * top_k, int(args.cold_gb * 1e9 / per_expert) + 1)
            impls = ["f32"] + (["i8"] if bits in (2, 3, 4, 8) else [])
            for impl in impls:
                t = time_gemv(bits, n, k, gs, experts, top_k, rotate=mode == "cold", repeat=args.repeat,
                              activations="int8" if impl == "i8" else "float32")
                results[bits, impl, mode] = t / top_k
            if bits in (2, 4, 8) and not args.no_ort:
                for acc in (0, 4):
                    results[bits, f"ort{acc}", mode] = time_ort(
                        bits, n, k, gs, top_k if mode == "hot" else experts, acc, args.threads, args.repeat,
                        hot=mode == "hot")
            log.info("bits %d %s: %s", bits, mode, {i: f"{t * 1e6:.1f} us" for (b, i, m), t in
                                                      results.items() if b == bits and m == mode})
    print_table(results, shapes, gs, top_k, dram_bw, cache_bw, args)
    print(f"\nload average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"(this benchmark itself adds about {args.threads})")


def print_table(results, shapes, gs, top_k, dram_bw, cache_bw, args) -> None:
    """Effective GB/s (canonical bytes of the expert / time), % of DRAM read bandwidth, ratios."""
    print(f"\nread bandwidth ({args.threads} threads, best of numpy/TVM sums): DRAM {dram_bw:.1f} GB/s, "
          f"cache {cache_bw:.1f} GB/s; group {gs}, top-k {top_k}; hot {args.hot_n}x{args.hot_k} "
          f"(same experts every call), cold {args.n}x{args.k} (rotating over a > {args.cold_gb} GB stack)")
    print("f32/i8 = moec GEMV with float32/int8 activations; ORT0/ORT4 = MatMulNBits accuracy_level 0/4; "
          "GB/s = canonical packed bytes per expert / time; ratio = ORT time / moec time (> 1: moec faster)")
    impls = ["f32", "i8", "ort0", "ort4"]
    for mode, (n, k) in shapes.items():
        head = (f"{mode:>4} bits | " + " | ".join(f"{i:>4} GB/s  %DRAM  us/exp" for i in impls)
                + " | f32/ORT0 i8/ORT4 best/ORT4")
        print("\n" + head + "\n" + "-" * len(head))
        for bits in sorted({b for b, _, m in results if m == mode}):
            nbytes = expert_nbytes(bits, n, k, gs)
            cells = []
            for impl in impls:
                t = results.get((bits, impl, mode))
                gbs = nbytes / t / 1e9 if t else 0.0
                cells.append(f"{'-':>9} {'-':>6} {'-':>7}" if t is None else
                             f"{gbs:9.1f} {100 * gbs / dram_bw:5.0f}% {t * 1e6:7.1f}")
            ratios = []
            for a, b in (("ort0", "f32"), ("ort4", "i8")):
                ta, tb = results.get((bits, a, mode)), results.get((bits, b, mode))
                ratios.append(f"{ta / tb:8.2f}" if ta and tb else f"{'-':>8}")
            best = min(results[bits, i, mode] for i in ("f32", "i8") if (bits, i, mode) in results)
            t4 = results.get((bits, "ort4", mode))
            ratios.append(f"{t4 / best:9.2f}" if t4 else f"{'-':>9}")
            print(f"{bits:>9} | " + " | ".join(cells) + " | " + " ".join(ratios))


if __name__ == "__main__":
    main()
