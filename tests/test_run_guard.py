"""Where a run lands is checked before Ray starts: --name stays inside --storage, storage
that others can write is refused, and a run resumes (unpickling what storage holds) only
on --resume. Every refusal here is the real CLI's, exit 2, with no Ray started."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import ray

from cluster.cli import main
from cluster.guard import check_name, check_run_target
from trainers.configtools import ConfigError

BAD_NAMES = ["../../x", "/tmp/abs", "a/b", "a\nb", ".", "..", "", "-flag", ".hidden", "x" * 129, "a b"]


@pytest.fixture(autouse=True)
def no_ray_after(no_ray_before):
    yield
    assert not ray.is_initialized(), "a refused request started Ray"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_would_leave_the_storage_is_refused_by_train_tune_and_submit(tmp_path, capsys, name):
    storage = str(tmp_path / "runs")
    given = f"--name={name}"  # the = form, so that argparse takes "-flag" as a value
    for argv in (["train", "--storage", storage, given],
                 ["tune", "--space", "digits_cnn", "--storage", storage, given],
                 ["submit", "--address", "http://127.0.0.1:9", given, "--", "train"],
                 ["submit", "--address", "http://127.0.0.1:9", "--", "tune", "--space", "digits_cnn", given]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--name: {name[:79]!r}"[:60] in err and "not a valid run name; use one path component" in err, err
    assert not (tmp_path / "x").exists() and not os.path.exists("/tmp/abs")


def test_a_long_name_is_shown_truncated():
    with pytest.raises(ConfigError) as err:
        check_name("y" * 5000)
    assert "…" in err.value.problems[0] and len(err.value.problems[0]) < 250


def test_safe_names_are_accepted():
    for name in ("digits", "run-1.2_a", "A", "x" * 128, "tune-digits_cnn-20261130-101500"):
        assert check_name(name) == name


def test_reusing_a_name_needs_resume_and_resume_needs_a_run(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    for argv in (["train", "--storage", str(tmp_path), "--name", "old"],
                 ["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--name", "old"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--name old: {tmp_path / 'old'} already exists; pass --resume" in err, err
    for argv in (["train", "--storage", str(tmp_path), "--name", "new", "--resume"],
                 ["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--name", "new", "--resume"]):
        assert main(argv) == 2
        assert f"--resume: nothing to resume at {tmp_path / 'new'}" in capsys.readouterr().err
    assert main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--name", "old", "--resume"]) == 2
    assert "holds no Tune search to resume" in capsys.readouterr().err
    assert main(["train", "--storage", str(tmp_path), "--resume"]) == 2
    assert "--resume: name the run to continue with --name NAME" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "train", "--resume"]) == 2
    assert "--resume: name the run to continue" in capsys.readouterr().err


class _Planted:
    """What an attacker leaves as tuner.pkl: unpickling it creates a file (it could run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_tuner_pkl_is_not_loaded_by_rerunning_the_name(tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "runs" / "s").mkdir(parents=True)
    (tmp_path / "runs" / "s" / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    assert main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path / "runs"), "--name", "s"]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_storage_that_others_can_write_is_refused_with_the_fix(tmp_path, capsys, mode):
    storage = tmp_path / "shared"
    storage.mkdir()
    storage.chmod(mode)
    assert main(["train", "--storage", str(storage), "--name", "n"]) == 2
    err = capsys.readouterr().err
    assert f"--storage: {storage} (mode {mode:04o}) is writable by other users; run `chmod go-w {storage}`" in err


def test_a_directory_above_the_storage_that_others_can_write_is_refused(tmp_path, capsys):
    above = tmp_path / "open"
    (above / "mine").mkdir(parents=True)
    above.chmod(0o777)  # anyone could rename "mine" away and put their own in its place
    assert main(["train", "--storage", str(above / "mine" / "runs"), "--name", "n"]) == 2
    assert f"{above} (mode 0777) is writable by other users" in capsys.readouterr().err


def test_storage_under_a_sticky_world_writable_directory_is_made_private(tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may add entries, not replace ours
    old_umask = os.umask(0o002)  # a umask that would leave new directories group-writable
    try:
        store = check_run_target(str(sticky / "a" / "runs"), "n", resume=False, command="train")
    finally:
        os.umask(old_umask)
    assert store.root == str(sticky / "a" / "runs" / "n")
    for made in (sticky / "a", sticky / "a" / "runs"):
        assert made.stat().st_mode & 0o777 == 0o755
    check_run_target(str(sticky / "a" / "runs"), "n2", resume=False, command="train")  # and accepted next time


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_storage_owned_by_another_user_is_refused(tmp_path, capsys):
    storage = tmp_path / "theirs"
    storage.mkdir(mode=0o755)
    os.chown(storage, 12345, 12345)
    assert main(["train", "--storage", str(storage), "--name", "n"]) == 2
    assert f"{storage} belongs to another user (uid 12345)" in capsys.readouterr().err


def test_resume_refuses_run_files_that_others_can_write(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir(mode=0o755)
    (run / "tuner.pkl").write_bytes(b"")
    (run / "tuner.pkl").chmod(0o666)
    assert main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--name", "r", "--resume"]) == 2
    assert f"{run / 'tuner.pkl'} (mode 0666) is writable by other users" in capsys.readouterr().err


def test_a_checkpoint_whose_unpickling_would_run_code_is_refused_and_runs_nothing(tmp_path):
    import torch

    from trainers.checkpoints import CheckpointError, load_state

    marker = tmp_path / "pwned"
    planted = tmp_path / "checkpoint_000001"
    planted.mkdir()
    torch.save({"model": {}, "meta": _Planted(marker)}, planted / "state.pt")  # pickles the call, runs nothing
    with pytest.raises(CheckpointError, match="refusing to load; it needs arbitrary unpickling"):
        load_state(planted)  # what resume, predict, export and the test evaluation all call
    assert not marker.exists()


def test_every_torch_load_in_raysweep_is_weights_only():
    root = Path(__file__).resolve().parents[1]
    calls = [(path.relative_to(root), line.strip())
             for package in ("cluster", "trainers", "search_spaces", "benchmarks")
             for path in sorted((root / package).rglob("*.py"))
             for line in path.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls
