"""Train moec's reference model: a small Mixtral-architecture MoE on the Python 3.11 docs (offline).

The corpus is the reST sources of Debian's ``python3.11-doc`` package
(``/usr/share/doc/python3.11/html/_sources``). Files are split by a hash of their
relative path: 2 in 50 go to the held-out split, 2 in 50 to calibration, the rest to
training. The two small splits are written to ``reference/data`` and committed, so
evaluation never depends on the Debian package; their sha256 is printed and recorded
in ``reference/data/SHA256SUMS``.

Usage::

    python tools/train_reference.py --out reference/checkpoint --minutes 45
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moec.models.checkpoint import save_checkpoint
from moec.core.config import MoEConfig
from moec.models.model import MoEModel

log = logging.getLogger("train_reference")
CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
SPLIT_CAP = 240_000  # characters per committed split
EOT = "<|endoftext|>"


def split_corpus(root: Path) -> tuple[list[str], str, str]:
    """(training documents, calibration text, held-out text), deterministic."""
    if not root.is_dir():
        sys.exit(f"error: corpus {root} not found; install it with: apt-get install python3.11-doc")
    train, calib, held = [], [], []
    for f in sorted(root.rglob("*.txt")):
        rel = f.relative_to(root).as_posix()
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) < 200:
            continue
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 50
        (held if bucket < 2 else calib if bucket < 4 else train).append(text)
    join = lambda docs: (f"\n{EOT}\n".join(docs))[:SPLIT_CAP]  # noqa: E731
    return train, join(calib), join(held)


def train_tokenizer(docs: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def encode(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def load_balance_loss(model: MoEModel, x_cache: list) -> torch.Tensor:
    """Switch-style auxiliary loss summed over layers (kept small so routing stays uneven)."""
    total = torch.zeros(())
    for probs, idx in x_cache:
        e = probs.shape[-1]
        frac = torch.zeros(e).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / idx.numel()
        total = total + e * (frac * probs.mean(0)).sum()
    return total


class _RouterTap:
    """Observer that keeps router probabilities for the auxiliary loss."""

    def __init__(self) -> None:
        self.seen: list = []

    def on_moe(self, layer, x, probs, topk_idx, topk_w, contrib_norm, y_norm) -> None:
        self.seen.append((probs, topk_idx))


@torch.no_grad()
def evaluate(model: MoEModel, data: torch.Tensor, seq: int) -> tuple[float, float]:
    model.eval()
    n = (len(data) - 1) // seq
    x = data[: n * seq].view(n, seq)
    y = data[1: n * seq + 1].view(n, seq)
    nll, correct, count = 0.0, 0, 0
    for i in range(0, n, 16):
        logits = model(x[i:i + 16])
        nll += F.cross_entropy(logits.flatten(0, 1), y[i:i + 16].flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y[i:i + 16]).sum().item()
        count += y[i:i + 16].numel()
    model.train()
    return math.exp(nll / count), correct / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reference/checkpoint")
    ap.add_argument("--data-out", default="reference/data")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=1e-3, help="load-balance loss coefficient")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)

    train_docs, calib, held = split_corpus(CORPUS)
    data_dir = Path(args.data_out)
    data_dir.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, text in (("calib.txt", calib), ("heldout.txt", held)):
        (data_dir / name).write_text(text, encoding="utf-8")
        sums.append(f"{hashlib.sha256(text.encode()).hexdigest()}  {name}")
    (data_dir / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    log.info("splits: %d training docs, calib %d chars, held-out %d chars", len(train_docs), len(calib), len(held))

    tok = train_tokenizer(train_docs, args.vocab)
    train_ids = encode(tok, train_docs)
    held_ids = encode(tok, [held])
    log.info("training tokens: %d, held-out tokens: %d", len(train_ids), len(held_ids))

    cfg = MoEConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, num_layers=4, num_heads=4,
                    num_kv_heads=2, num_experts=8, top_k=2, expert_intermediate=256,
                    rms_eps=1e-5, rope_theta=10000.0, max_position=1024, norm_topk_prob=True)
    model = MoEModel(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name:
            torch.nn.init.normal_(p, std=0.02)
    tap = _RouterTap()
    model.set_observer(tap)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = 100
    start = time.time()
    budget = args.minutes * 60
    history = []
    step = 0
    model.train()
    while step < args.max_steps:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        progress = min(1.0, max(step / args.max_steps, elapsed / budget))
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,))
        x = torch.stack([train_ids[s: s + args.seq] for s in starts])
        y = torch.stack([train_ids[s + 1: s + args.seq + 1] for s in starts])
        tap.seen.clear()
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss = ce + args.aux * load_balance_loss(model, tap.seen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log.info("step %d  loss %.3f  lr %.2e  %.0fs", step, ce.item(), lr, time.time() - start)
        if step % 500 == 0:
            model.set_observer(None)
            ppl, acc = evaluate(model, held_ids[:32768], args.seq)
            model.set_observer(tap)
            history.append({"step": step, "heldout_ppl": ppl, "heldout_top1": acc})
            log.info("step %d  held-out ppl %.2f  top1 %.3f", step, ppl, acc)

    model.set_observer(None)
    ppl, acc = evaluate(model, held_ids, args.seq)
    log.info("final: %d steps, held-out ppl %.2f, top1 %.4f", step, ppl, acc)
    out = Path(args.out)
    save_checkpoint(model.eval(), out, dtype=torch.float16)
    tok.save(str(out / "tokenizer.json"))
    (out / "training_log.json").write_text(json.dumps({
        "corpus": str(CORPUS), "steps": step, "batch": args.batch, "seq": args.seq,
        "tokens_seen": step * args.batch * args.seq, "train_tokens": len(train_ids),
        "minutes": (time.time() - start) / 60, "aux_coef": args.aux, "lr": args.lr, "seed": args.seed,
        "final_heldout_ppl_fp32": ppl, "final_heldout_top1_fp32": acc, "history": history,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
