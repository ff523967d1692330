"""`moec run`: generate text from a bundle with the TVM runtime, streaming tokens and printing tokens/s."""

from __future__ import annotations

import click

from moec.errors import MoecError


@click.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, help="Tokens to generate (greedy).")
def run_cmd(bundle, prompt, max_new_tokens):
    """Generate text from a compiled BUNDLE (hashes verified before loading)."""
    from moec.runtime.session import BundleSession

    sess = BundleSession(bundle)
    if sess.tokenizer is None:
        raise MoecError(f"bundle '{bundle}' has no tokenizer.json; cannot encode a text prompt")
    ids = sess.tokenizer.encode(prompt).ids
    if not ids:
        raise MoecError("prompt encodes to no tokens")
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
    click.echo(f"[{stats.prompt_tokens} prompt tokens in {stats.prefill_seconds:.2f} s; {stats.new_tokens} new tokens, "
               f"decode {stats.decode_tokens_per_s:.1f} tokens/s]", err=True)
