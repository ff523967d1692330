"""`moec run`: generate text from a bundle with the TVM runtime, streaming tokens and printing tokens/s."""

from __future__ import annotations

import click

from moec.core.errors import MoecError


@click.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 1 << 20), default=32, show_default=True,
              help="Tokens to generate (greedy); prompt + these must fit max_position_embeddings.")
@click.option("--rpc", "tracker", default=None, metavar="HOST:PORT",
              help="Run on a device requested from this TVM RPC tracker instead of this machine.")
@click.option("--key", default=None, help="Device key at the tracker (default: the bundle target's rpc_key).")
@click.option("--trust", type=click.Path(dir_okay=False), default=None,
              help="Ed25519 public key (.pub from moec keygen): run only bundles signed by its private key.")
@click.option("--trust-verified", is_flag=True, default=False,
              help="Skip re-hashing bundle files unchanged (size, mtime, ctime, inode) since you last loaded "
                   "them with this flag after a full check; everything else is still checked. Opt-in: "
                   "see README 'Bundle load' for what it does not protect against.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for a free device (--rpc).")
def run_cmd(bundle, prompt, max_new_tokens, tracker, key, trust, trust_verified, timeout):
    """Generate text from a compiled BUNDLE (hashes verified before loading), here or on a remote device."""
    from moec.runtime.session import BundleSession

    if tracker is None:
        if key is not None:
            raise MoecError("--key needs --rpc HOST:PORT (the tracker to ask)")
        sess = BundleSession(bundle, trust=trust, trust_verified=trust_verified)
    else:
        from moec.runtime.session import open_remote_bundle
        sess = open_remote_bundle(bundle, tracker, key, timeout=timeout, trust=trust)
    try:
        stats = _generate(sess, bundle, prompt, max_new_tokens)
    finally:
        sess.close()  # on a remote device: end the RPC session so the server is free again
    where = "" if tracker is None else f" on remote device via tracker {tracker}"
    click.echo(f"[{stats.prompt_tokens} prompt tokens in {stats.prefill_seconds:.2f} s; {stats.new_tokens} new tokens, "
               f"decode {stats.decode_tokens_per_s:.1f} tokens/s{where}]", err=True)


def _generate(sess, bundle, prompt: str, max_new_tokens: int):
    """Stream the continuation of ``prompt`` to stdout; returns the generation stats."""
    if sess.tokenizer is None:
        raise MoecError(f"bundle '{bundle}' has no tokenizer.json; cannot encode a text prompt")
    ids = sess.tokenizer.encode(prompt).ids
    if not ids:
        raise MoecError("prompt encodes to no tokens")
    sess.check_positions(len(ids), max_new_tokens)
    click.echo(prompt, nl=False)
    shown = ""
    generated: list[int] = []

    def on_token(t: int) -> None:
        nonlocal shown
        generated.append(t)
        text = sess.tokenizer.decode(generated)
        click.echo(text[len(shown):], nl=False)
        shown = text

    _, stats = sess.generate(ids, max_new_tokens, on_token=on_token)
    click.echo("")
    return stats
