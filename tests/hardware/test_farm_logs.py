"""A context-managed LocalFarm cleans up the log folder it made, unless the block failed."""

from __future__ import annotations

from moec.hardware.farm import LocalFarm


def test_own_logs_removed_on_a_clean_exit():
    farm = LocalFarm(servers=1)
    assert farm.log_dir.is_dir()
    farm.__exit__(None, None, None)  # nothing started: stop() has nothing to stop
    assert not farm.log_dir.exists()


def test_own_logs_kept_when_the_block_raised():
    farm = LocalFarm(servers=1)
    (farm.log_dir / "server-0.log").write_text("why it failed\n")
    err = RuntimeError("boom")
    farm.__exit__(RuntimeError, err, None)
    assert (farm.log_dir / "server-0.log").read_text() == "why it failed\n"
    farm.remove_logs()
    assert not farm.log_dir.exists()


def test_a_given_log_folder_is_never_removed(tmp_path):
    farm = LocalFarm(servers=1, log_dir=tmp_path / "logs")
    (tmp_path / "logs").mkdir()
    farm.__exit__(None, None, None)
    assert (tmp_path / "logs").is_dir()
