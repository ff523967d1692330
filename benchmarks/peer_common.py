"""llama.cpp as a peer: convert, quantize, read GGUF tensor bytes, and score both engines on the same tokens.

Shared by ``peer_llamacpp.py`` (speed, size, perplexity per llama.cpp type) and ``frontier.py``
(size–perplexity frontier). Nothing in moec or its tests imports this; it needs a llama.cpp build
from ``tools/setup_llamacpp.sh``.

Same-position perplexity: ``llama-perplexity -c N -b N`` tokenizes the whole text (special tokens
such as ``<|endoftext|>`` are *not* parsed: they become ordinary text tokens), cuts it into
``len // N`` consecutive chunks of ``N`` tokens (replacing each chunk's first token by BOS when the
vocabulary adds one) and scores, in every chunk, the ``N - 1 - N/2`` tokens after position ``N/2``.
moec is driven to match: :func:`llama_perplexity` saves llama.cpp's token ids (``--save-all-logits``
writes them into its header), :func:`same_tokens` checks that moec's tokenizer (the same
``tokenizer.json``, with ``encode_special_tokens``) gives exactly those ids, and
:func:`moec_perplexity` scores the same chunks and positions
(``moec.profile.data.context_chunks`` + ``evaluate_windows(score_from=N // 2)``).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

#: llama.cpp type -> the bits of the moec uniform plan it is paired with.
PAIRS = {"Q8_0": 8, "Q4_0": 4, "Q4_K_M": 4, "Q3_K_S": 3, "Q2_K": 2}
#: OpenMP's default busy-wait makes a 2-thread llama.cpp collapse on a shared machine.
LLAMA_ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
CONVERT = r'''
import runpy, sys
lc = sys.argv[1]
sys.path.insert(0, lc)
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = [lc + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


#: GGUF types the converter can write as the base that llama-quantize reads (``--gguf-base``).
GGUF_BASES = ("f32", "bf16", "q8_0")


def convert(ckpt: Path, root: Path, out: Path, base: str = "f32") -> Path:
    """HF checkpoint -> ``base`` GGUF with llama.cpp's converter (cached in ``out``).

    ``f32`` is exact for any checkpoint (the perplexity baseline); ``bf16`` is exact for a bf16
    checkpoint at half the disk; ``q8_0`` is the converter's own Q8_0, for a checkpoint whose float
    copy does not fit on disk (the other types are then requantized from it: speed and size only).
    """
    gguf = f32_name(ckpt, out, base)
    if not gguf.exists():
        lc = root / "src/vendor/llama.cpp"
        env = dict(os.environ, PYTHONPATH=f"{root / 'pydeps'}")
        part = gguf.with_name(gguf.name + ".part")
        subprocess.run([sys.executable, "-c", CONVERT, str(lc), str(ckpt), "--outtype", base,
                        "--outfile", str(part)], env=env, check=True)
        part.rename(gguf)
    return gguf


def f32_name(ckpt: Path, out: Path, base: str = "f32") -> Path:
    """Where :func:`convert` keeps ``ckpt``'s ``base`` (default f32) GGUF (a q8_0 base is the Q8_0 type's file)."""
    return out / f"{ckpt.resolve().name}-{'Q8_0' if base == 'q8_0' else base}.gguf"


def quantize(root: Path, base: Path, qtype: str) -> Path:
    """``base`` quantized to ``qtype`` by ``llama-quantize`` (cached next to it); a Q8_0 base is its own Q8_0,
    and other types are requantized from it (``--allow-requantize``)."""
    q = quantized_name(base, qtype)
    if q == base:
        return base
    if not q.exists():
        part = q.with_name(q.name + ".part")  # renamed when complete: an interrupted run leaves no GGUF
        requant = ["--allow-requantize"] if base.name.endswith("-Q8_0.gguf") else []
        subprocess.run([str(root / "build/bin/llama-quantize"), *requant, str(base), str(part), qtype], check=True,
                       capture_output=True)
        part.rename(q)
    return q


def quantized_name(base: Path, qtype: str) -> Path:
    """Where :func:`quantize` keeps ``base``'s ``qtype`` GGUF."""
    stem = base.name.rsplit("-", 1)[0]
    return base.with_name(f"{stem}-{qtype}.gguf")


def gguf_tensor_bytes(root: Path, gguf: Path) -> int:
    """Bytes of all tensors in a GGUF file (weights, norms, router; no tokenizer or other metadata)."""
    gp = str(root / "src/vendor/llama.cpp/gguf-py")
    if gp not in sys.path:
        sys.path.insert(0, gp)
    import gguf as gguf_py  # llama.cpp's own reader, from its source tree

    return sum(int(t.n_bytes) for t in gguf_py.GGUFReader(str(gguf)).tensors)


def llama_perplexity(root: Path, gguf: Path, text: Path, n_ctx: int, threads: int,
                     want_tokens: bool = False, chunks: int = -1) -> tuple[float, np.ndarray | None]:
    """(perplexity, the scored chunks' token ids ``[n_chunk * n_ctx]`` or None) from ``llama-perplexity``.

    ``chunks`` > 0 scores only the first ``chunks`` chunks (``--chunks``).
    """
    with tempfile.TemporaryDirectory(prefix="moec-ppl-") as tmp:
        logits = Path(tmp) / "all.logits"
        cmd = [str(root / "build/bin/llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(n_ctx),
               "-b", str(n_ctx), "-t", str(threads), "--chunks", str(chunks)]
        if want_tokens:
            cmd += ["--save-all-logits", str(logits)]
        for _ in range(3):  # on a loaded machine its asynchronous logger sometimes loses the last lines at exit
            out = subprocess.run(cmd, env=LLAMA_ENV, check=True, capture_output=True, text=True)
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
            if m:
                break
        else:
            raise RuntimeError(f"llama-perplexity printed no final estimate:\n{out.stderr[-2000:]}")
        tokens = None
        if want_tokens:
            with open(logits, "rb") as f:
                head = f.read(20)
                assert head[:8] == b"_logits_", "unexpected llama.cpp logits file"
                ctx, _vocab, n_chunk = np.frombuffer(head[8:20], np.int32)
                assert ctx == n_ctx
                tokens = np.frombuffer(f.read(int(n_chunk) * n_ctx * 4), np.int32).copy()
        return float(m.group(1)), tokens


def same_tokens(ckpt: Path, text: Path, llama_ids: np.ndarray) -> tuple[list[int], int | None]:
    """moec's token ids of ``text`` (special tokens as text, as llama.cpp tokenizes), checked equal to llama.cpp's.

    Returns ``(ids, bos)``: ``bos`` is the BOS id when llama.cpp prepended one (its chunks then start
    with BOS), else None. Raises if the ids differ anywhere in the scored chunks.
    """
    from moec.models.tokenizer import load_tokenizer
    from moec.profile.data import read_text

    tok = load_tokenizer(ckpt)
    tok.encode_special_tokens = True  # llama-perplexity tokenizes with parse_special = false
    ids = tok.encode(read_text(text)).ids
    ref = llama_ids.tolist()
    bos = None
    if ids[:len(ref)] != ref and ref[1:] == ids[:len(ref) - 1]:
        bos, ids = ref[0], [ref[0]] + ids
    if ids[:len(ref)] != ref:
        first = next(i for i, (a, b) in enumerate(zip(ids, ref)) if a != b)
        raise RuntimeError(f"token ids differ from llama.cpp's at position {first}: moec {ids[first:first + 5]} "
                           f"llama.cpp {ref[first:first + 5]}")
    return ids[:len(ref)], bos


def moec_perplexity(model, plan, chunks, n_ctx: int, **quant_kwargs) -> float:
    """Perplexity of ``model`` fake-quantized to ``plan`` (None: float32) on llama.cpp's scored positions."""
    from moec.profile.evaluate import evaluate_windows
    from moec.quant.packed_model import fake_quantize_model

    m = copy.deepcopy(model)
    if plan is not None:
        fake_quantize_model(m, plan, **quant_kwargs)
    return evaluate_windows(m, chunks, batch=8, score_from=n_ctx // 2).perplexity


def param_count(ckpt: Path) -> int:
    """Parameters in the checkpoint's safetensors files (the denominator of bits per weight for both engines)."""
    from safetensors import safe_open
    total = 0
    for path in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            for k in f.keys():
                total += int(np.prod(f.get_slice(k).get_shape()))
    return total


def frontier_row(t: str, lbytes: int, lppl: float, base: float, plan: str, nbytes: int, ppl: float,
                 mbase: float, n_params: int) -> str:
    """One markdown row of the size-perplexity frontier: llama.cpp type ``t`` against a moec plan
    (bytes, bits per weight, perplexity against each engine's float baseline, and whether moec dominates)."""
    dom = nbytes <= lbytes and ppl <= lppl
    return (f"| {t} | {lbytes / 1e6:.3f} ({lbytes * 8 / n_params:.2f}) | "
            f"{lppl:.4f} ({(lppl / base - 1) * 100:+.2f} %) | {plan} | "
            f"{nbytes / 1e6:.3f} ({nbytes * 8 / n_params:.2f}) | {ppl:.4f} ({(ppl / mbase - 1) * 100:+.2f} %) | "
            f"{'**yes**' if dom else f'no ({(ppl / lppl - 1) * 100:+.2f} % perplexity)'} |")


def print_frontier(rows: list[str], n_chunks: int, n_ctx: int, base: float, mbase: float, plan_header: str,
                   extra: str = "") -> None:
    """The frontier table under its scoring line (chunks, scored positions, both float baselines)."""
    print(f"load average after: {os.getloadavg()}\n")
    print(f"{n_chunks} chunks of {n_ctx} ({n_chunks * (n_ctx - 1 - n_ctx // 2)} scored positions); "
          f"float baselines: llama.cpp f32 {base:.4f}, moec FP32 {mbase:.4f}{extra}\n")
    print(f"| llama.cpp type | tensor MB (bpw) | llama.cpp PPL (vs f32) | {plan_header} | "
          "moec MB (bpw) | moec PPL (vs FP32) | moec dominates |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def add_scoring_args(ap, types: str) -> None:
    """The options every frontier script shares: checkpoint, llama.cpp build, held-out text, context, threads, types."""
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "reference/data/heldout.txt")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=types)
