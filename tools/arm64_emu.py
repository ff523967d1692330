#!/usr/bin/env python3
"""Set up and start the emulated 64-bit ARM device (aarch64 TVM RPC server under qemu-user).

  python tools/arm64_emu.py setup                 # idempotent; ~/.cache/moec/arm64-emu or $MOEC_EMU_DIR
  python tools/arm64_emu.py start                 # own tracker on a free loopback port; Ctrl-C stops all
  python tools/arm64_emu.py start --tracker 127.0.0.1:9190 --key arm64-emu
  python tools/arm64_emu.py check                 # is the device set up? which TVM does it run?

While it runs: moec run BUNDLE --rpc 127.0.0.1:PORT --key arm64-emu --prompt "..." (an aarch64 bundle).
Timings under emulation say nothing about real ARM speed.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from moec.core.errors import MoecError  # noqa: E402
from moec.hardware import emulated  # noqa: E402


def _step(name: str, seconds: float) -> None:
    click.echo(f"  ✓ {name:<32} {seconds:6.1f} s")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _dir_option(f):
    return click.option("--dir", "root", type=click.Path(file_okay=False), default=None,
                        help="Device folder (default: $MOEC_EMU_DIR or ~/.cache/moec/arm64-emu).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log each command.")
def cli(verbose: bool) -> None:
    """Emulated arm64 device for moec (qemu-user + aarch64 TVM runtime)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@cli.command()
@_dir_option
@click.option("--force", is_flag=True, help="Rebuild everything.")
def setup(root, force):
    """Set up the device (apt packages as root, arm64 userland, aarch64 TVM wheel)."""
    t0 = time.time()
    dev = emulated.setup_device(root, force=force, on_step=_step)
    info = dev.info()
    click.echo(f"device ready in {dev.root} ({info['size_mb']:.0f} MB, TVM {info['device_tvm']} on "
               f"{info['machine']}); this call took {time.time() - t0:.1f} s")


@cli.command()
@_dir_option
def check(root):
    """Say whether the device is set up."""
    dev = emulated.EmulatedDevice(Path(root).expanduser().resolve() if root else emulated.default_dir())
    if not dev.is_ready():
        raise MoecError(f"no device set up in {dev.root}; run: python tools/arm64_emu.py setup")
    click.echo(f"ready: {dev.root} {dev.info()}")


@cli.command()
@_dir_option
@click.option("--tracker", default=None, metavar="HOST:PORT", help="Register with this tracker (default: start one).")
@click.option("--key", default="arm64-emu", show_default=True, help="Device key at the tracker.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the server to register.")
def start(root, tracker, key, timeout):
    """Start the device's RPC server (and a tracker unless --tracker); runs until Ctrl-C or SIGTERM."""
    run = emulated.start_device(tracker, key, root, timeout, on_step=_step)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background job ignores it
        signal.signal(sig, _interrupt)
    try:
        click.echo(f"device '{key}' is registered at tracker {run.tracker_address} "
                   f"(server pid {run.server.pid}, logs {run.server.log_path.parent}); Ctrl-C stops it")
        click.echo(f"  try: moec run BUNDLE --rpc {run.tracker_address} --key {key} --prompt 'Hello'")
        while run.server.alive() and (run.tracker is None or run.tracker.alive()):
            time.sleep(1.0)
        raise MoecError(f"the device stopped unexpectedly: {run.server.log_tail()}")
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        run.stop()


def main() -> None:
    try:
        cli(prog_name="arm64_emu.py", standalone_mode=True)
    except MoecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
