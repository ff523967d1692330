"""`moec targets`: list the target presets or show one."""

from __future__ import annotations

import click
import yaml

from moec.cli.table import format_table
from moec.hardware.targets import builtin_names, load_target


@click.group("targets", invoke_without_command=True)
@click.pass_context
def targets_cmd(ctx):
    """List target presets (`moec targets`) or show one (`moec targets show NAME`)."""
    if ctx.invoked_subcommand is None:
        rows = []
        for name in builtin_names():
            t = load_target(name)
            rows.append([t.name, t.family, t.tvm_target.get("kind", "?"), t.rpc_key,
                         ",".join(map(str, t.allowed_bits)), t.description])
        click.echo(format_table(["name", "family", "kind", "rpc key", "bits", "description"], rows))


@targets_cmd.command("show")
@click.argument("name")
def show(name):
    """Print one preset (a built-in name or a preset YAML path) as YAML."""
    click.echo(yaml.safe_dump(load_target(name).model_dump(), sort_keys=False).rstrip())
