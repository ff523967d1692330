"""`moec keygen`: make an Ed25519 key pair for signing bundles (--sign) and trusting them (--trust)."""

from __future__ import annotations

import click


@click.command("keygen")
@click.argument("key", type=click.Path(dir_okay=False))
def keygen_cmd(key):
    """Write a new private key to KEY (mode 0600) and its public key to KEY.pub.

    Sign with ``moec compile/build --sign KEY``; run with ``moec run --trust KEY.pub``.
    """
    from moec.artifact.signing import generate_keypair

    priv, pub = generate_keypair(key)
    click.echo(f"private key {priv} (keep it secret), public key {pub}")
