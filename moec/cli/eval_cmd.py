"""`moec eval`: perplexity and next-token top-1 accuracy of a checkpoint (optionally under a plan)."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import data_config, data_options, echo_json


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@data_options
@click.option("--plan", type=click.Path(dir_okay=False), default=None,
              help="Bit plan JSON: evaluate the model fake-quantized to this plan.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(checkpoint, data, seq_len, max_tokens, batch, plan, as_json):
    """Perplexity and next-token top-1 accuracy on a text file (moec's accuracy metric)."""
    res = api.evaluate(checkpoint, data_config(data, seq_len, max_tokens, batch), plan=plan,
                       progress=not as_json)
    if as_json:
        echo_json(res.to_dict())
    else:
        click.echo(f"tokens      {res.tokens}\nperplexity  {res.perplexity:.3f}\ntop-1       {res.top1:.4f}")
