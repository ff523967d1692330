"""`moec run`: generate text from a bundle with the TVM runtime, streaming tokens and printing tokens/s."""

from __future__ import annotations

import time

import click

from moec.core.errors import MoecError


@click.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 1 << 20), default=32, show_default=True,
              help="Tokens to generate (greedy); prompt + these must fit max_position_embeddings.")
@click.option("--context", type=int, default=None,
              help="KV cache capacity in tokens, allocated once (default: the model's max_position_embeddings up to "
                   "1024, or prompt + new tokens when more); a generation that would pass a given context is refused.")
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
@click.option("--plan", "plan", default=None, metavar="PLAN",
              help="Nested bundles (compile --nested): serve the routed experts at this plan's widths "
                   "(plan JSON or uniform:B) instead of the compiled one.")
@click.option("--switch", "switches", multiple=True, metavar="STEP:PLAN",
              help="Nested bundles: switch to PLAN after STEP new tokens, without reloading (repeatable). "
                   "A plan the bundle cannot serve is refused in one line and generation goes on under the "
                   "plan in force.")
@click.option("--adapt", default=None, metavar="memory:MB|latency:MS|energy:J|drift:TV",
              help="Nested bundles: memory:MB serves the plan whose routed experts read at most MB megabytes "
                   "(coldest experts, by the bundle's profile, evicted to the narrowest width first); latency:MS "
                   "moves along the bundle's plan front to keep the median decode step under MS ms; energy:J serves the "
                   "widest front plan whose modelled J/token is at most J; drift:TV re-plans at the same bytes when "
                   "the routing of the last 16 tokens is more than TV (total variation) away from the profile's.")
@click.option("--verbose", is_flag=True, help="Print the plan in force and every plan switch (stderr).")
def run_cmd(bundle, prompt, max_new_tokens, context, tracker, key, trust, trust_verified, timeout, plan, switches, adapt, verbose):
    """Generate text from a compiled BUNDLE (hashes verified before loading), here or on a remote device."""
    from moec.runtime.session import BundleSession

    schedule = _parse_switches(switches)
    policy = None
    if adapt is not None:
        from moec.runtime.adapt import parse_adapt
        if plan is not None:
            raise MoecError("--adapt picks the plan itself; drop --plan")
        policy = parse_adapt(adapt)

    if tracker is None:
        if key is not None:
            raise MoecError("--key needs --rpc HOST:PORT (the tracker to ask)")
        sess = BundleSession(bundle, trust=trust, trust_verified=trust_verified, context=context)
    else:
        from moec.runtime.session import open_remote_bundle
        sess = open_remote_bundle(bundle, tracker, key, timeout=timeout, trust=trust, context=context)
    try:
        if plan is not None:
            sess.set_plan(plan)
        controller = None
        if policy is not None and policy[0] == "memory":
            sess.set_plan(sess.memory_plan(policy[1]))
        elif policy is not None and policy[0] == "energy":
            sess.set_plan(sess.energy_plan(policy[1]))
        elif policy is not None and policy[0] == "drift":
            from moec.runtime.adapt import DriftController
            controller = DriftController(sess, sess.drift_monitor(window=16, threshold=policy[1]))
        elif policy is not None:
            from moec.runtime.adapt import LatencyController
            controller = LatencyController(sess.plan_ladder(), policy[1])
            sess.set_plan(controller.ladder[0])
        if verbose:
            _show_plan(sess)
        stats = _generate(sess, bundle, prompt, max_new_tokens, schedule, verbose, controller)
    finally:
        sess.close()  # on a remote device: end the RPC session so the server is free again
    where = "" if tracker is None else f" on remote device via tracker {tracker}"
    click.echo(f"[{stats.prompt_tokens} prompt tokens in {stats.prefill_seconds:.2f} s; {stats.new_tokens} new tokens, "
               f"decode {stats.decode_tokens_per_s:.1f} tokens/s{where}]", err=True)


def _parse_switches(switches: tuple[str, ...]) -> dict[int, str]:
    out = {}
    for item in switches:
        step, _, plan = item.partition(":")
        if not step.isdigit() or not plan:
            raise MoecError(f"--switch expects STEP:PLAN (e.g. 16:uniform:2), got {item[:60]!r}")
        out[int(step)] = plan
    return out


def _show_plan(sess) -> None:
    if not sess.nested:
        click.echo(f"plan in force: fixed at compile time (mean {sess.plan.average_expert_bits():.2f} expert bits)",
                   err=True)
        return
    widths = [b for layer in sess.plan.experts.values() for b in layer.values()]
    counts = ", ".join(f"{widths.count(b)}x{b}-bit" for b in sorted(set(widths)))
    click.echo(f"plan in force: mean {sum(widths) / len(widths):.2f} bits ({counts}), "
               f"{sess.expert_bytes() / 1e6:.3f} MB of experts", err=True)


def _generate(sess, bundle, prompt: str, max_new_tokens: int, schedule: dict[int, str] | None = None,
              verbose: bool = False, controller=None):
    """Stream the continuation of ``prompt`` to stdout (switching plans per ``schedule``); returns the stats."""
    if sess.tokenizer is None:
        raise MoecError(f"bundle '{bundle}' has no tokenizer.json; cannot encode a text prompt")
    ids = sess.tokenizer.encode(prompt).ids
    if not ids:
        raise MoecError("prompt encodes to no tokens")
    sess.check_positions(len(ids), max_new_tokens)
    click.echo(prompt, nl=False)
    shown = ""
    generated: list[int] = []
    last: list[float | None] = [None]  # when the previous token came out (step times for --adapt latency)

    def on_token(t: int) -> None:
        nonlocal shown
        generated.append(t)
        text = sess.tokenizer.decode(generated)
        click.echo(text[len(shown):], nl=False)
        shown = text
        step = len(generated)
        now = time.perf_counter()
        wanted = None
        if controller is not None and last[0] is not None:
            wanted = controller.observe(now - last[0])
        last[0] = now
        if schedule and step in schedule:
            wanted = schedule[step]
        if wanted is not None:
            try:
                switch = sess.set_plan(wanted)
            except MoecError as exc:  # the plan in force stays; generation goes on
                click.echo(f"\nplan switch at step {step} refused: {exc}", err=True)
                return
            if verbose:
                click.echo(f"\nswitch at step {step}: {switch.changed} expert(s) changed, mean "
                           f"{switch.average_bits:.2f} bits, {switch.expert_bytes / 1e6:.3f} MB of experts, "
                           f"{switch.seconds * 1e3:.2f} ms", err=True)

    _, stats = sess.generate(ids, max_new_tokens, on_token=on_token)
    click.echo("")
    return stats
