"""`moec inspect`: show the plan and metadata of an exported ONNX model or a bundle (verified)."""

from __future__ import annotations

import click

from moec.cli.table import echo_json
from moec.export.inspect import inspect_file


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@click.option("--verify", is_flag=True,
              help="Only verify the bundle (schema, file list, sizes, sha256, signature with --trust); "
                   "print one line, exit non-zero if it fails.")
@click.option("--trust", type=click.Path(dir_okay=False), default=None,
              help="Ed25519 public key: also require a valid signature by its private key.")
def inspect_cmd(path, as_json, verify, trust):
    """Show the bit plan (layer × expert table), sizes and metadata of PATH (.onnx or bundle directory).

    A bundle is always verified first (every file listed and hashed, nothing else in it).
    """
    from moec.export.inspect_onnx import OnnxInspection, format_inspection

    if verify or trust is not None:
        from moec.artifact.bundle import verify_bundle
        m = verify_bundle(path, trust)
        sig = ("signature verified" if m["_signature_checked"] else
               "signed (signature not checked: pass --trust PUBKEY)" if m["_signed"] else "unsigned")
        if verify:
            click.echo(f"bundle '{path}' verified: {len(m['files'])} files match manifest.json; {sig}")
            return
    ins = inspect_file(path)
    if isinstance(ins, OnnxInspection):
        if as_json:
            echo_json(ins.to_dict())
        else:
            click.echo(format_inspection(ins))
        return
    from moec.artifact.inspect_bundle import format_bundle
    if as_json:
        echo_json(ins)
    else:
        click.echo(format_bundle(ins))
