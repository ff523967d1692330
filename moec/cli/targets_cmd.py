"""`moec targets`: list the target presets or show one."""

from __future__ import annotations

import click
import yaml

from moec.cli.table import format_table
from moec.core.targets import TargetPreset, builtin_names, load_target


def _device(t: TargetPreset) -> str:
    """Short device column: the TVM kind with its arch/CPU, plus the host CPU when there is one."""
    spec = t.tvm_target
    dev = spec.get("kind", "?") + (f" {spec.get('arch') or spec.get('mcpu') or spec.get('mtriple') or ''}").rstrip()
    if t.tvm_host:
        dev += f" + {t.tvm_host.get('mcpu') or t.tvm_host.get('mtriple', 'host')}"
    return dev


@click.group("targets", invoke_without_command=True)
@click.pass_context
def targets_cmd(ctx):
    """List target presets (`moec targets`) or show one (`moec targets show NAME`)."""
    if ctx.invoked_subcommand is None:
        rows = []
        for name in builtin_names():
            t = load_target(name)
            rows.append([t.name, t.family, _device(t), t.cross_compiler or "-", t.rpc_key,
                         ",".join(map(str, t.allowed_bits)), f"{t.memory_budget_mb:.0f}", t.description])
        click.echo(format_table(["name", "family", "device", "cross compiler", "rpc key", "bits",
                                 "memory MB", "description"], rows))


@targets_cmd.command("show")
@click.argument("name")
def show(name):
    """Print one preset (a built-in name or a preset YAML path) as YAML."""
    click.echo(yaml.safe_dump(load_target(name).model_dump(), sort_keys=False).rstrip())
