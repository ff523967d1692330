"""`moec farm`: start a local RPC device farm (up/down), show a tracker's devices (status), profile bundles."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from moec.cli.table import format_table
from moec.core.errors import MoecError
from moec.hardware.farm import DEFAULT_STATE, LocalFarm, check_bind, farm_down, is_loopback, write_state
from moec.hardware.tracker_client import tracker_status


@click.group("farm")
def farm_cmd():
    """Start or query a TVM RPC device farm (stock tracker and servers, loopback by default)."""


@farm_cmd.command("up")
@click.option("--servers", default=2, show_default=True, help="RPC servers to start.")
@click.option("--key", default="host", show_default=True, help="Device key the servers register with.")
@click.option("--port", type=int, default=None, help="Tracker port (default: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback unless --insecure-bind).")
@click.option("--insecure-bind", is_flag=True,
              help="Allow a non-loopback --host: anyone who reaches that address can load code on the servers.")
@click.option("--threads", type=int, default=None, help="TVM_NUM_THREADS of the servers (default: all cores).")
@click.option("--stock", is_flag=True, help="Plain tvm.exec.rpc_server (no on-device energy sampler).")
@click.option("--detach", is_flag=True, help="Return at once; stop later with 'moec farm down'.")
@click.option("--state", type=click.Path(dir_okay=False), default=str(DEFAULT_STATE), show_default=True,
              help="State file written by --detach.")
@click.option("--wait", "wait_s", default=120.0, show_default=True, help="Seconds to wait for the servers.")
def up(servers, key, port, host, threads, stock, detach, state, wait_s, insecure_bind):
    """Start a tracker and SERVERS RPC servers; prints the tracker address."""
    check_bind(host, insecure_bind)
    if insecure_bind and not is_loopback(host):
        click.echo(f"warning: binding {host}: the TVM RPC protocol has no authentication; anyone who reaches "
                   "it can load and run code on these servers", err=True)
    farm = LocalFarm(servers, key, port, host, sampler=not stock, threads=threads)
    addr = farm.start(wait_s)
    if detach:
        path = write_state(farm, state)
        click.echo(f"tracker {addr}  ({servers} server(s), key '{key}'; state {path}; logs {farm.log_dir})")
        return
    click.echo(f"tracker {addr}  ({servers} server(s), key '{key}'; logs {farm.log_dir}); Ctrl-C stops")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.poll() is None for p in [farm.tracker_proc, *farm.servers]):
            time.sleep(0.5)
        click.echo("a farm process exited; stopping the farm", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        farm.stop()
        farm.remove_logs()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@farm_cmd.command("down")
@click.option("--state", type=click.Path(dir_okay=False), default=str(DEFAULT_STATE), show_default=True)
def down(state):
    """Stop a farm started with 'moec farm up --detach'."""
    s = farm_down(state)
    click.echo(f"stopped tracker {s.tracker} and {len(s.server_pids)} server(s)")


@farm_cmd.command("status")
@click.option("--tracker", default="127.0.0.1:9190", show_default=True, help="HOST:PORT of the tracker.")
@click.option("--wait", "wait_s", default=10.0, show_default=True, help="Seconds to wait for the tracker.")
def status(tracker, wait_s):
    """Devices per key on a tracker: total, free, pending requests."""
    keys = tracker_status(tracker, wait_s)
    rows = [[k.key, k.total, k.free, k.pending, " ".join(k.servers)] for k in keys.values()]
    click.echo(format_table(["key", "total", "free", "pending", "servers"], rows, align="lrrrl")
               if rows else f"tracker {tracker}: no devices registered")


@farm_cmd.command("profile")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tracker", required=True, help="HOST:PORT of the tracker.")
@click.option("--key", required=True, help="Device key to measure on.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False), required=True,
              help="SQLite measurement store (created if missing).")
@click.option("--repeats", default=7, show_default=True)
@click.option("--steps", default=8, show_default=True, help="Decode steps per timing.")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="Seconds per measurement.")
@click.option("--kernels", is_flag=True, help="Also time each bundle's GEMV kernel classes (bits x shape).")
def profile(bundles, tracker, key, store_path, repeats, steps, timeout_s, kernels):
    """Decode-step latency and energy of BUNDLES on KEY devices (stored; stored ones cost no device time)."""
    from moec.hardware.device_timing import measure_bundles
    from moec.hardware.store import MeasurementStore

    store = MeasurementStore(store_path)
    res = measure_bundles(tracker, key, [Path(b) for b in bundles], store, repeats=repeats, steps=steps,
                          timeout_s=timeout_s, progress=True)
    rows = [[m.label, m.status, _ms(m.median_s), _ms(m.spread_s),
             "-" if m.energy_j_per_token is None else f"{m.energy_j_per_token * 1e3:.4g}", m.energy_source,
             "store" if m.from_store else m.device] for m in res]
    click.echo(format_table(["bundle", "status", "median ms", "IQR ms", "mJ/token", "energy", "from"], rows,
                            align="llrrrll"))
    failed = [m for m in res if m.status != "ok"]
    if kernels:
        failed += _profile_kernels(bundles, tracker, key, store, repeats, timeout_s)
    if failed:
        raise MoecError(f"{len(failed)} measurement(s) failed (first: {failed[0].label or failed[0].fingerprint[:12]} "
                        f"{failed[0].status}: {(failed[0].detail or '?')[:120]})")


def _profile_kernels(bundles, tracker, key, store, repeats, timeout_s) -> list:
    """Time each bundle's kernel classes; returns the failed measurements."""
    from moec.artifact.bundle import read_manifest
    from moec.hardware.kernel_classes import plan_kernel_candidates
    from moec.hardware.device_timing import measure_kernels
    from moec.core.config import config_from_dict
    from moec.core.plan import BitPlan

    failed = []
    for b in bundles:
        man = read_manifest(b, verify=False)
        cands = plan_kernel_candidates(config_from_dict(man["model"]["config"]), BitPlan.from_json(man["plan"]),
                                       man["target"]["name"])
        res = measure_kernels(tracker, key, cands, store, repeats=repeats, timeout_s=timeout_s, progress=True)
        rows = [[c.bits, f"{c.n}x{c.k}", "expert" if c.stacked > 1 else "dense", c.routed, m.status,
                 f"{m.median_s * 1e6:.3g}" if m.median_s else "-", f"{m.spread_s * 1e6:.3g}" if m.spread_s else "-"]
                for c, m in zip(cands, res)]
        click.echo(f"\nkernel classes of {b}:")
        click.echo(format_table(["bits", "N x K", "kind", "routed", "status", "median us", "IQR us"], rows,
                                align="rllrlrr"))
        failed += [m for m in res if m.status != "ok"]
    return failed


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.4g}"
