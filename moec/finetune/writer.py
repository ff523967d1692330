"""Write a fine-tuned checkpoint directory atomically: HF weights (float32) + learned quantization + record."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moec.core.errors import MoecError
from moec.core.outputs import replace_dir, staging_prefix
from moec.models.checkpoint import save_checkpoint
from moec.models.learned_quant import LEARNED_QUANT_FILE

RECORD = "finetune.json"


def check_finetune_out(out: str | os.PathLike, source: str | os.PathLike, force: bool = False) -> Path:
    """Absolute ``out`` after checking it may be written: never the source checkpoint, never a foreign
    non-empty directory (one holding moec's ``finetune.json`` is ours) unless ``force``."""
    out = Path(out).absolute()
    if out.resolve() == Path(source).resolve():
        raise MoecError(f"--out '{out}' is the input checkpoint; write the fine-tuned one elsewhere")
    if out.is_symlink():
        raise MoecError(f"'{out}' is a symbolic link; refusing to write a checkpoint through it")
    if out.exists():
        if not out.is_dir():
            raise MoecError(f"'{out}' exists and is not a directory; refusing to overwrite it")
        if any(out.iterdir()) and not (out / RECORD).is_file() and not force:
            raise MoecError(f"'{out}' exists and was not written by moec finetune (no {RECORD}); refusing to "
                            "replace it (pass --force to replace it anyway)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoecError(f"cannot create output directory '{out.parent}': {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise MoecError(f"output directory '{out.parent}' is not writable")
    return out


@contextmanager
def staged_checkpoint(out: Path, tokenizer: Path) -> Iterator[Path]:
    """A staging directory beside ``out`` (with ``tokenizer.json`` copied in) that replaces ``out`` when the
    block ends without an error and is removed otherwise, so ``out`` is always a whole checkpoint."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{staging_prefix(out)}{os.getpid()}-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 is for the staging only
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_record(directory: Path, record: dict) -> None:
    (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def write_checkpoint(out: Path, student, tokenizer: Path, record: dict) -> None:
    """``out`` replaced by: model.safetensors (float32) + config.json + tokenizer.json + moec_quant/learned.safetensors
    + finetune.json (see :func:`staged_checkpoint`)."""
    with staged_checkpoint(out, tokenizer) as tmp:
        save_checkpoint(student.model, tmp)  # float32: the weights the learned codes were computed from
        student.learned().save(tmp)
        write_record(tmp, record)


__all__ = ["LEARNED_QUANT_FILE", "RECORD", "check_finetune_out", "staged_checkpoint", "write_checkpoint", "write_record"]
