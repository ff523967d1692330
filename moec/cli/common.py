"""Options and output helpers shared by several commands."""

from __future__ import annotations

import click

from moec.api import DataConfig
from moec.lower.kernels.activations import ACTIVATION_CHOICES, AUTO


def data_options(f):
    """--data / --seq-len / --max-tokens / --batch."""
    f = click.option("--batch", default=8, show_default=True, help="Windows per forward pass.")(f)
    f = click.option("--max-tokens", type=int, default=None, help="Use at most this many tokens of the data.")(f)
    f = click.option("--seq-len", default=256, show_default=True, help="Tokens per window.")(f)
    f = click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
                     help="UTF-8 text file (calibration or held-out text).")(f)
    return f


def data_config(data: str, seq_len: int, max_tokens: int | None, batch: int,
                max_memory_gb: float | None = None) -> DataConfig:
    return DataConfig(path=data, seq_len=seq_len, max_tokens=max_tokens, batch=batch, max_memory_gb=max_memory_gb)


def max_memory_option(f):
    """--max-memory-gb: the host-memory budget a stage keeps to (layer by layer above it)."""
    return click.option("--max-memory-gb", type=float, default=None,
                        help="Host memory budget in GB: larger checkpoints are processed one decoder layer at a "
                             "time; fails at once if one layer does not fit [auto: layer by layer above 2 GB].")(f)


def output_options(f):
    """--force / --sign KEY of the commands that write a bundle."""
    f = click.option("--sign", "sign_key", type=click.Path(dir_okay=False), default=None,
                     help="Sign the bundle's manifest with this Ed25519 private key (moec keygen).")(f)
    f = click.option("--force", is_flag=True,
                     help="Replace --out even if it is a directory moec did not write.")(f)
    return f


def activations_option(f):
    """--activations of compile and build: auto (int8 where the target has int8 kernels), float32 or int8."""
    return click.option(
        "--activations", type=click.Choice(ACTIVATION_CHOICES), default=AUTO, show_default=True,
        help="Activations of the quantized GEMVs and prefill GEMMs: int8 per group (integer dot products, like "
             "llama.cpp's quantized matmuls; ~1e-2 relative error per product, +0.02 % perplexity on the reference "
             "model) or float32 (exact against `moec eval --plan`). auto: int8 where the target's kernels have "
             "int8 dot products (x86 AVX-512 VNNI or AVX2, ARM dotprod; per width: x86 3-bit needs VNNI), float32 "
             "elsewhere. CUDA targets take int8 on request (dp4a GEMVs, activations quantized in the kernel; auto "
             "stays float32 there until timed on a GPU). The manifest records which.")(f)
