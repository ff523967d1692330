"""``BundleSession(prefill=...)`` / ``MOEC_PREFILL``: a bundle's prompts through its ``prefill`` function, or fed as
decode steps (the way around a device whose prefill misbehaves); the same tokens either way."""

import pytest

from moec.core.errors import MoecError
from moec.runtime.session import BundleSession, prefill_mode
from tests.conftest import compile_tiny_bundle

pytestmark = pytest.mark.tvm


def test_steps_feed_the_prompt_as_decode_steps_with_the_same_tokens(tmp_path, monkeypatch):
    bundle, manifest = compile_tiny_bundle(tmp_path, "--target", "host", "--plan", "uniform:4")
    assert "prefill" in manifest["entry"]
    prompt = [5, 17, 42, 7, 99, 3]
    with BundleSession(bundle) as sess:
        assert sess.has_prefill
        calls = []
        run = sess._run
        monkeypatch.setattr(sess, "_run", lambda entry, *a, **k: (calls.append(entry), run(entry, *a, **k))[1])
        want, _ = sess.generate(prompt, 5)
        assert calls[0] == "prefill" and calls.count("prefill") == 1
    monkeypatch.setenv("MOEC_PREFILL", "steps")
    with BundleSession(bundle) as sess:
        assert not sess.has_prefill and sess.prefill_mode == "steps"
        calls = []
        run = sess._run
        monkeypatch.setattr(sess, "_run", lambda entry, *a, **k: (calls.append(entry), run(entry, *a, **k))[1])
        got, _ = sess.generate(prompt, 5)
        assert "prefill" not in calls and calls.count("decode") == len(prompt) + 4
    assert got == want
    with BundleSession(bundle, prefill="call") as sess:  # the argument wins over the environment
        assert sess.has_prefill


@pytest.mark.parametrize("arg, env, source", [("graph", None, "prefill"), (None, "fast", "MOEC_PREFILL")])
def test_a_bad_mode_is_one_line(monkeypatch, arg, env, source):
    if env is not None:
        monkeypatch.setenv("MOEC_PREFILL", env)
    with pytest.raises(MoecError) as err:
        prefill_mode(arg)
    assert str(err.value).startswith(source) and "call, steps" in str(err.value) and "\n" not in str(err.value)


def test_moec_run_with_a_bad_mode_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from moec.cli.main import cli
    bundle, _ = compile_tiny_bundle(tmp_path, "--target", "host", "--plan", "uniform:4")
    monkeypatch.setenv("MOEC_PREFILL", "fast")
    res = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", "hi", "--max-new-tokens", "2"])
    assert res.exit_code != 0 and "MOEC_PREFILL must be one of call, steps" in res.output
    assert "Traceback" not in res.output
