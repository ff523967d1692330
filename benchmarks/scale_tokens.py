"""Greedy tokens of one engine for benchmarks/scale.py: onnxruntime (decode graph only) or the TVM bundle.

    python benchmarks/scale_tokens.py ort|tvm ONNX_DIR BUNDLE_DIR PROMPT N TOKENS_JSON

Each engine runs in its own process so its peak memory is measured alone; the tokens are merged
into TOKENS_JSON under the engine's name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


def ort_tokens(onnx_dir: Path, ids: list[int], n: int) -> list[int]:
    """Greedy decoding through decode.onnx alone: the prompt fed one token per step."""
    from moec.export.ort_runner import OrtModel

    m = OrtModel(onnx_dir, threads=2, graphs=("decode",))
    cfg = m.summary["config"]
    past = [np.zeros((1, cfg["num_kv_heads"], 0, cfg["head_dim"]), np.float32)] * (2 * cfg["num_layers"])
    for t in ids:
        logits, past = m.step(t, past)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        if len(out) < n:
            logits, past = m.step(out[-1], past)
    return out


def tvm_tokens(bundle: Path, ids: list[int], n: int) -> list[int]:
    from moec.runtime.session import BundleSession

    with BundleSession(bundle) as s:
        s.eos = None  # compare a fixed number of tokens
        return s.generate(ids, n)[0]


def main() -> None:
    engine, onnx_dir, bundle, prompt, n, out = sys.argv[1:7]
    ids = Tokenizer.from_file(str(Path(bundle) / "tokenizer.json")).encode(prompt).ids
    toks = ort_tokens(Path(onnx_dir), ids, int(n)) if engine == "ort" else tvm_tokens(Path(bundle), ids, int(n))
    path = Path(out)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[engine] = toks
    path.write_text(json.dumps(data))
    print(engine, toks)


if __name__ == "__main__":
    main()
