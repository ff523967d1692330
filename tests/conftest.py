"""Shared fixtures: tiny MoE checkpoints built in code (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moec.models.checkpoint import save_checkpoint
from moec.core.config import MoEConfig
from moec.models.model import MoEModel
from tests.xdist_groups import pytest_collection_modifyitems  # noqa: F401  (a hook: xdist groups under pytest 9)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "reference" / "checkpoint"
REFERENCE_DATA = REPO / "reference" / "data"

TEXT = ("The quick brown fox jumps over the lazy dog. Python is a programming language. "
        "Experts in a mixture of experts model are selected by a router for every token. ") * 20


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


def compile_tiny_bundle(tmp_path: Path, *options: str, seed: int = 0) -> tuple[Path, dict]:
    """A tiny checkpoint (:func:`make_tiny_checkpoint`, ``seed``) compiled by ``moec compile`` with ``options``
    (e.g. ``"--target", "jetson-agx-orin", "--plan", "uniform:4"``) into ``tmp_path / "bundle"``, which must
    succeed: ``(bundle directory, manifest)``."""
    import json

    from click.testing import CliRunner

    from moec.cli.main import cli
    make_tiny_checkpoint(tmp_path / "ckpt", seed=seed)
    out = tmp_path / "bundle"
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "ckpt"), *options, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "manifest.json").read_text())


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
