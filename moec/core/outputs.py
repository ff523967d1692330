"""Safe output directories: refuse foreign directories, write beside and rename, reclaim stale temp dirs.

moec never deletes or overwrites a directory it did not write. A directory counts as moec's
when it is empty or holds moec's marker (a bundle's ``manifest.json`` of format
``moec-bundle``, an export's ``export.json``); anything else needs ``force``. Work and
assembly directories carry the creating process id in their name (``<prefix><pid>-XXXX``), so
a later run reclaims those whose process is gone (SIGKILL leaves no chance to clean up).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moec.core.errors import MoecError

BUNDLE_MARKER = "manifest.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix><pid>-*`` directories whose process no longer exists; returns them."""
    removed = []
    pat = re.compile(re.escape(prefix) + r"(\d+)-")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = pat.match(e.name)
        if m and e.is_dir(follow_symlinks=False) and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def work_dir(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A private temporary directory ``<prefix><pid>-XXXX`` (stale ones reclaimed first), removed on exit."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    reclaim_stale(parent, prefix)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise MoecError(f"cannot create a temporary directory in '{parent}': {exc.strerror or exc}") from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def is_moec_bundle(path: Path) -> bool:
    """Whether ``path`` holds moec's bundle marker (a manifest of format moec-bundle)."""
    mf = path / BUNDLE_MARKER
    try:
        if mf.is_symlink() or not mf.is_file() or mf.stat().st_size > (64 << 20):
            return False
        data = json.loads(mf.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == "moec-bundle"


def check_output_dir(out: str | os.PathLike, force: bool = False, what: str = "bundle") -> Path:
    """Absolute ``out`` after checking moec may write it; creates its parent. Raises MoecError.

    Call it before any heavy work so an unwritable or foreign ``out`` fails at once.
    """
    out = Path(out).absolute()
    if out.is_symlink():
        raise MoecError(f"'{out}' is a symbolic link; refusing to write a {what} through it")
    if out.exists():
        if not out.is_dir():
            raise MoecError(f"'{out}' exists and is not a directory; refusing to overwrite it")
        if any(out.iterdir()) and not is_moec_bundle(out) and not force:
            raise MoecError(f"'{out}' exists and was not written by moec (no moec {what} marker); "
                            "refusing to replace it (pass --force to replace it anyway)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoecError(f"cannot create output directory '{parent}': {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoecError(f"output directory '{parent}' is not writable")
    return out


def staging_prefix(out: Path) -> str:
    return f".{out.name}.moec-tmp-"


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first, then removed.
    An interrupted run publishes nothing (:func:`raise_if_interrupted`)."""
    raise_if_interrupted()
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{staging_prefix(out)}{os.getpid()}-old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


_handlers_installed = False
_interrupted: list[int] = []


def interrupted() -> bool:
    """Whether SIGINT/SIGTERM arrived (an exception raised after that is the interruption's echo,
    e.g. TVM turning KeyboardInterrupt into RuntimeError inside a build)."""
    return bool(_interrupted)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal arrived, even if its exception was swallowed on the way: a signal
    handled while TVM runs a Python callback comes back as a TVM error, which a schedule rule's
    ``except Exception`` takes for "no match", and the build would then finish as if nothing happened."""
    if _interrupted:
        raise KeyboardInterrupt(f"signal {_interrupted[-1]}")


def install_signal_cleanup() -> None:
    """Turn SIGINT, SIGTERM (and SIGHUP) into KeyboardInterrupt so ``finally`` blocks remove temp dirs."""
    global _handlers_installed
    if _handlers_installed:
        return

    def _raise(signum, frame):
        _interrupted.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError, OSError):  # not the main thread
                signal.signal(sig, _raise)
    _handlers_installed = True
