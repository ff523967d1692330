"""Shared fixtures: tiny MoE checkpoints built in code (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moec.models.checkpoint import save_checkpoint
from moec.core.config import MoEConfig
from moec.models.model import MoEModel

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "reference" / "checkpoint"
REFERENCE_DATA = REPO / "reference" / "data"

TEXT = ("The quick brown fox jumps over the lazy dog. Python is a programming language. "
        "Experts in a mixture of experts model are selected by a router for every token. ") * 20


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make ``xdist_group`` marks work under ``--dist loadgroup`` with pytest 9.

    pytest-xdist 3.8 groups tests by an ``@group`` suffix it writes into ``item._nodeid``; pytest 9 keeps
    a node's id in ``item._id``, so the suffix was lost and every group was spread over both workers
    (module fixtures built on each, the emulated arm64 device shared by two). Where the suffix is
    missing, it is added here the way xdist means to (nothing to do on a pytest where xdist's works)."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


def tiny_tokenizer(vocab: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def make_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> MoEConfig:
    """Random Mixtral-architecture checkpoint with a tokenizer, in ``path``."""
    tok = tiny_tokenizer()
    fields = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=4, top_k=2, expert_intermediate=64, rms_eps=1e-5)
    fields.update(overrides)
    cfg = MoEConfig(**fields)
    torch.manual_seed(seed)
    model = MoEModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    save_checkpoint(model, path)
    tok.save(str(path / "tokenizer.json"))
    return cfg


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    path = tmp_path / "tiny"
    make_tiny_checkpoint(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "data.txt"
    p.write_text(TEXT)
    return p


def require_reference() -> Path:
    if not (REFERENCE / "model.safetensors").is_file():
        pytest.skip("reference checkpoint not trained yet")
    return REFERENCE
