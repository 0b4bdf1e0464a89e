"""Bad input is refused before Ray starts, with exit 2 and a message naming what to fix,
never a traceback (issue 22). Plain functions: no Ray starts here; a tripwire on
``connect`` fails any test whose request would have reached Ray."""

from __future__ import annotations

import dataclasses
import math
import time
import types
import typing

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster import cli
from cluster.guard import check_run_target
from cluster.store import ResultsStore
from search_spaces.space import parse_space
from trainers import config as config_module
from trainers.checkpoints import CheckpointError, load_state
from trainers.configtools import ConfigError, clean_error
from trainers.data import DataError, decode_image


@pytest.fixture
def no_ray(monkeypatch):
    """Fail at once where a command would start or join Ray: every check here must come first."""
    def tripwire(*args, **kwargs):
        raise AssertionError("the request reached Ray; it should have been refused before")

    for module in ("cluster.train_cmd", "cluster.tune_cmd"):
        monkeypatch.setattr(f"{module}.connect", tripwire)


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def run_cli_in(tmp_path, argv, capsys) -> tuple[int, str]:
    """``run_cli`` with train and tune given storage under ``tmp_path``, unless a case names its own."""
    own_storage = argv[0] in ("train", "tune") and "--storage" not in argv
    return run_cli(argv + (["--storage", str(tmp_path / "runs")] if own_storage else []), capsys)


# -- numbers ---------------------------------------------------------------------------

def _float_fields(cls=config_module.TrainRunConfig, prefix=""):
    """Every float field of every config section, as dotted keys (the class of the bug)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _float_fields(hint, f"{prefix}{f.name}.")
        elif float in (hint, *typing.get_args(hint)):
            yield f"{prefix}{f.name}"


FLOAT_KEYS = list(_float_fields())


def test_every_float_field_is_found():
    assert {"optim.lr", "optim.weight_decay", "model.dropout", "optim.momentum", "loss.label_smoothing",
            "train.early_stopping.min_delta"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", float("nan"), math.inf])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused(key, raw):
    with pytest.raises(ConfigError) as e:
        config_module.load_run_config(None, [f"{key}={raw}"])
    assert any(p.startswith(f"{key}:") and "finite" in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("argv", [
    ["train", "--cpus-per-worker", "0"], ["train", "--cpus-per-worker", "-1"], ["train", "--cpus-per-worker", "nan"],
    ["train", "--workers", "0"],
    ["tune", "--space", "digits_cnn", "--cpus-per-worker", "0"], ["tune", "--space", "digits_cnn", "--gpus-per-worker", "-1"],
    ["tune", "--space", "digits_cnn", "--trials", "0"], ["tune", "--space", "digits_cnn", "--cpus-per-worker", "inf"],
    ["jobs", "logs", "x", "--tail", "-3"], ["head", "--num-cpus", "-1"], ["results", "runs/x", "--top", "-1"],
])
def test_resource_flags_must_be_positive_finite(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert argv[-2] in capsys.readouterr().err


@pytest.mark.parametrize("placement", [dict(cpus_per_worker=0.0), dict(cpus_per_worker=-1.0),
                                       dict(cpus_per_worker=math.nan), dict(workers=0),
                                       dict(use_gpu=True, gpus_per_worker=2.0)])
def test_the_python_api_checks_the_placement_too(tmp_path, no_ray, placement):
    from cluster import train_cmd
    from trainers.distributed import Placement

    req = train_cmd.TrainRequest(config_module.TrainRunConfig(), Placement(**placement), str(tmp_path), "r")
    with pytest.raises(ConfigError, match="must"):
        train_cmd.run(req)


# -- storage ---------------------------------------------------------------------------

def test_storage_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    for storage in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ConfigError, match="a file stands where a directory should"):
            check_run_target(str(storage), "run", False, "train")


def test_read_only_storage_is_refused():
    # /proc is read-only for everyone, root included (chmod does not stop root).
    with pytest.raises(ConfigError, match="--storage /proc: cannot write there"):
        check_run_target("/proc", "run", False, "train")


def test_s3_storage_without_its_bucket_is_refused(s3_server):
    with pytest.raises(ConfigError, match="--storage s3://no-such-bucket/runs: cannot write there"):
        check_run_target("s3://no-such-bucket/runs", "run", False, "train")


def test_s3_storage_that_works_is_accepted(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="raysweep-runs")
    store = check_run_target("s3://raysweep-runs/runs", "run", False, "train")
    assert store.read_table("trials.parquet") is None  # nothing left behind by the write check


def test_unreachable_s3_endpoint_is_refused_in_seconds(monkeypatch, capsys, tmp_path, no_ray):
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    code, err = run_cli(["train", "--storage", "s3://bucket/runs", "--name", "r"], capsys)
    assert code == 2 and "--storage s3://bucket/runs" in err
    assert time.monotonic() - started < 30  # short S3 timeouts (trainers/uris.py), not minutes of retries


def test_unknown_storage_scheme_is_refused(capsys, no_ray):
    code, err = run_cli(["train", "--storage", "nosuch://bucket/runs", "--name", "r"], capsys)
    assert code == 2 and "--storage 'nosuch://bucket/runs'" in err


# -- search spaces ---------------------------------------------------------------------

BAD_SPACES = {
    "unknown optimizer among the choices": (
        {"optim.name": {"type": "categorical", "choices": ["adam", "nadamx"]}}, "params.optim.name: the value 'nadamx'"),
    "lr bound beyond the config's": (
        {"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 200}}, "params.optim.lr: the value 200"),
    "int bound beyond the config's": (
        {"augment.crop_padding": {"type": "int", "low": 0, "high": 100}}, "params.augment.crop_padding: the value 100"),
    "data dimension": ({"data.val_fraction": {"type": "uniform", "low": 0.1, "high": 0.2}}, "data settings cannot be searched"),
    "condition on a later dimension": (
        {"optim.momentum": {"type": "uniform", "low": 0.8, "high": 0.9, "when": {"optim.name": ["momentum"]}},
         "optim.name": {"type": "categorical", "choices": ["adam", "momentum"]}}, "must be a categorical dimension listed before it"),
    "condition that can never hold": (
        {"optim.name": {"type": "categorical", "choices": ["adam", "momentum"]},
         "optim.momentum": {"type": "uniform", "low": 0.8, "high": 0.9, "when": {"optim.name": ["sgd"]}}},
        "can never hold"),
    "text as a bound": ({"optim.lr": {"type": "loguniform", "low": "abc", "high": 0.1}}, "params.optim.lr.low: 'abc'"),
    "text as a default": ({"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 0.1, "default": "x"}},
                          "params.optim.lr.default: 'x'"),
    "nan as a bound": ({"model.dropout": {"type": "uniform", "low": float("nan"), "high": 0.5}}, "params.model.dropout.low"),
}


@pytest.mark.parametrize("case", BAD_SPACES)
def test_bad_search_values_are_refused(case):
    params, expected = BAD_SPACES[case]
    with pytest.raises(ConfigError) as e:
        parse_space({"name": "s", "params": params}, "s.yaml")
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_space_values_are_checked_with_the_users_settings(tmp_path, capsys, no_ray):
    space = tmp_path / "s.yaml"
    space.write_text("params:\n  model.pretrained: {type: categorical, choices: [" + str(tmp_path / "none.pth") + "]}\n")
    code, err = run_cli(["tune", "--space", str(space), "--storage", str(tmp_path / "runs")], capsys)
    assert code == 2 and "model.pretrained" in err and "none.pth" in err


# -- files raysweep reads --------------------------------------------------------------

def _bad_files(tmp_path):
    """(argv, the text the message must hold) for each kind of bad file."""
    (tmp_path / "latin1.yaml").write_bytes(b"optim:\n  name: caf\xe9\n")
    (tmp_path / "a_dir").mkdir()
    exp = tmp_path / "runs" / "exp"
    exp.mkdir(parents=True)
    (exp / "trials.parquet").write_bytes(b"PAR1 not really parquet")
    exp2 = tmp_path / "runs" / "exp2"
    exp2.mkdir()
    pq.write_table(pa.table({"trial_id": ["a"], "best_val_accuracy": [0.5]}), exp2 / "trials.parquet")
    (exp2 / "best.json").write_text("{not json")
    exp3 = tmp_path / "runs" / "exp3"
    (exp3 / "trials.parquet").mkdir(parents=True)  # read as an empty data set, shown as no rows, exit 0
    empty, cut = tmp_path / "empty", tmp_path / "cut"
    empty.mkdir()
    cut.mkdir()
    (empty / "state.pt").write_bytes(b"")
    import torch

    torch.save({"model": {"w": torch.zeros(100)}, "meta": {}}, cut / "state.pt")
    (cut / "state.pt").write_bytes((cut / "state.pt").read_bytes()[:300])
    return {
        "non-UTF-8 config": (["train", "--config", str(tmp_path / "latin1.yaml")], "not UTF-8"),
        "directory as config": (["train", "--config", str(tmp_path / "a_dir")], "a_dir"),
        "directory as space": (["tune", "--space", str(tmp_path / "a_dir")], "a_dir"),
        "non-UTF-8 space": (["tune", "--space", str(tmp_path / "latin1.yaml")], "not UTF-8"),
        "corrupt trials.parquet": (["results", str(exp)], f"{exp}/trials.parquet: cannot be read"),
        "corrupt best.json": (["results", str(exp2)], f"{exp2}/best.json: cannot be read"),
        "directory as trials.parquet": (["results", str(exp3)], f"{exp3}/trials.parquet: cannot be read: is a directory"),
        "unknown URI scheme for results": (["results", "nosuch://bucket/runs/x"], "nosuch://bucket/runs"),
        "empty state.pt": (["export", "--checkpoint", str(empty), "--out", str(tmp_path / "m.pt")],
                           f"{empty}/state.pt: cannot be read"),
        "truncated state.pt": (["export", "--checkpoint", str(cut), "--out", str(tmp_path / "m.pt")],
                               f"{cut}/state.pt: cannot be read"),
        "corrupt best.json behind --checkpoint": (["predict", "--checkpoint", str(exp2), "--data", "digits",
                                                    "--out", str(tmp_path / "p.parquet")], f"{exp2}/best.json"),
    }


BAD_FILE_CASES = ["non-UTF-8 config", "directory as config", "directory as space", "non-UTF-8 space",
                  "corrupt trials.parquet", "corrupt best.json", "directory as trials.parquet", "unknown URI scheme for results",
                  "empty state.pt", "truncated state.pt", "corrupt best.json behind --checkpoint"]


@pytest.mark.parametrize("case", BAD_FILE_CASES)
def test_bad_files_give_exit_2_naming_the_file(case, tmp_path, capsys, no_ray):
    argv, expected = _bad_files(tmp_path)[case]
    code, err = run_cli_in(tmp_path, argv, capsys)
    assert code == 2, err
    assert expected in err
    if case != "directory as space":  # that one is a bad argument (neither a file nor a shipped space)
        assert "invalid configuration" not in err  # a file's problem is not called a config's


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"\x80\x02garbage"])
def test_load_state_names_the_file_whatever_is_wrong(tmp_path, content):
    (tmp_path / "state.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=str(tmp_path / "state.pt")):
        load_state(tmp_path)


@pytest.mark.parametrize("weights, reason", [(None, "no such file"), (b"", "cannot be read"),
                                             (b"PK\x03\x04 cut short", "cannot be read")])
def test_missing_or_broken_pretrained_weights_are_refused_before_ray(tmp_path, capsys, no_ray, weights, reason):
    if weights is not None:
        (tmp_path / "w.pth").write_bytes(weights)
    code, err = run_cli(["train", "--set", "model.name=resnet50", "--set", f"model.pretrained={tmp_path}/w.pth",
                         "--storage", str(tmp_path / "runs")], capsys)
    assert code == 2 and f"model.pretrained '{tmp_path}/w.pth'" in err and reason in err
    assert not (tmp_path / "runs").exists()  # refused before anything was made


def test_readable_pretrained_weights_pass_the_check(tmp_path):
    import torch

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "w.pth")
    cfg = config_module.load_run_config(None, [f"model.pretrained={tmp_path}/w.pth"])
    from trainers.configpaths import path_problems

    assert path_problems(cfg) == []


# -- the store's temporary files -------------------------------------------------------

def test_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    store = ResultsStore(str(tmp_path), "run")
    (tmp_path / "run" / "summary.json" / "x").mkdir(parents=True)  # a directory where the file goes: rename fails
    with pytest.raises(OSError):
        store.write_json("summary.json", {"a": 1})
    with pytest.raises(OSError):
        store.write_table("summary.json", pa.table({"a": [1]}))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["summary.json"]


# -- error text ------------------------------------------------------------------------

def test_library_build_paths_are_dropped_from_errors():
    with pytest.raises(DataError) as e:
        decode_image(b"not an image at all", "/data/cat.png")
    text = str(e.value)
    assert text.startswith("/data/cat.png: not a readable image") and "Unsupported image file" in text
    assert "/__w/" not in text and ".cpp" not in text
    assert clean_error("boom\nException raised from f at /pytorch/c10/x.cpp:12 (most recent call first):\n"
                       "frame #0: c10::Error") == "boom"


def test_pretrained_runs_and_imagenet_that_cannot_be_used_are_refused_before_ray(tmp_path, capsys, no_ray,
                                                                                  monkeypatch):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "failed"}')  # a run that saved no checkpoint
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    for value, reason in ((str(run), "names no checkpoint"), ("imagenet", "not in the torch cache")):
        code, err = run_cli(["train", "--set", "model.name=resnet50", "--set", f"model.pretrained={value}",
                             "--storage", str(tmp_path / "runs")], capsys)
        assert code == 2 and reason in err, err
    assert not (tmp_path / "runs").exists()


def test_an_error_no_check_caught_is_one_capped_line_and_its_traceback_is_kept_privately(tmp_path, monkeypatch,
                                                                                          capsys):
    """The last net of the CLI: an input that no check knows yet (here a command that raises
    as such an input would) gives one line and exit 1, never a wall of frames or a huge value."""
    import re
    import tempfile
    from pathlib import Path

    def unchecked(args):
        raise ValueError("cannot use " + "x" * 5000 + " (/__w/vision/vision/torchvision/io/image.py:42)")

    cli.build_parser()  # registers every command
    monkeypatch.setitem(cli.COMMANDS, "results", (*cli.COMMANDS["results"][:2], unchecked))
    monkeypatch.delenv("RAYSWEEP_TRACEBACK", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(["results", str(tmp_path)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "/__w/" not in err and len(err) < 700
    assert err.startswith("raysweep results: unexpected error: ValueError: cannot use xxx") and "report" in err
    kept = Path(re.search(r"the traceback is in (\S+);", err).group(1))
    assert kept.parent == tmp_path and "Traceback" in kept.read_text() and kept.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("RAYSWEEP_TRACEBACK", "1")
    assert cli.main(["results", str(tmp_path)]) == cli.EXIT_FAILED
    assert "Traceback" in capsys.readouterr().err


def _probed_inputs(tmp_path):
    """Inputs a round of probing found escaping as tracebacks (each was exit 1 before)."""
    import json
    import os

    def write(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    os.mkfifo(tmp_path / "fifo.yaml")
    space = "params:\n  optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0}\n"
    runs = {name: tmp_path / name for name in ("best_str", "ckpt_int")}
    for run, record in zip(runs.values(), ('"x"', json.dumps({"checkpoint": 5}))):
        run.mkdir()
        (run / "best.json").write_text(record)
    pq.write_table(pa.table({"trial_id": ["a"], "best_val_accuracy": [0.5]}), runs["best_str"] / "trials.parquet")
    labels_as_text = tmp_path / "pq"
    labels_as_text.mkdir()
    pq.write_table(pa.table({"image": [b"x"] * 4, "label": ["a", "b", "a", "b"]}), labels_as_text / "part-0.parquet")
    (tmp_path / "one_class" / "cat").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / "one_class" / "cat" / f"{i}.png")
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    return {
        "parquet labels that are text": (["train", "--set", "data.name=parquet", "--set", f"data.root={labels_as_text}"],
                                         "the 'label' column is string"),
        "a corrupt CIFAR-10 archive": (["train", "--set", "data.name=cifar10", "--set", f"data.root={tmp_path}/cifar"],
                                       "data: cifar10 at"),
        "a key given twice": (["train", "--config", write("twice.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n")],
                              "twice.yaml, line 3: not valid YAML (the key 'lr' is given twice"),
        "a price file with a key given twice": (["train", "--price", write("ptwice.yaml", "a: 1\na: 2\n")],
                                                "line 2: not valid YAML (the key 'a' is given twice"),
        "results of a bucket, not a run": (["results", "s3://"], "EXPERIMENT 's3://': names no run"),
        "convert to a size past 4096": (["data", "convert", str(tmp_path), str(tmp_path / "out"), "--image-size",
                                         "1" + "0" * 30, "4"], "image_size: "),
        "a date no calendar has": (["train", "--config", write("date.yaml", "train:\n  seed: 2001-13-45\n")],
                                   "date.yaml: not valid YAML (ValueError"),
        "a tag its text cannot build": (["train", "--set", "optim.lr=!!int x"], "not valid YAML (ValueError"),
        "a FIFO as --config": (["train", "--config", str(tmp_path / "fifo.yaml")], "not a regular file"),
        "a FIFO as --price": (["train", "--price", str(tmp_path / "fifo.yaml")], "not a regular file"),
        "a price file nested too deep": (["train", "--price", write("deep.yaml", "[" * 100_000)], "nested too deeply"),
        "a price file with a bad date": (["train", "--price", write("pdate.yaml", "a: 2001-13-45\n")],
                                         "not valid YAML (ValueError"),
        "an int of 400 digits as a float": (["train", "--set", "optim.lr=1" + "0" * 400], "not a finite number"),
        "a space whose metric is a list": (["tune", "--space", write("m.yaml", "metric: [val_loss]\n" + space)],
                                           "metric ['val_loss'] is not one of"),
        "a space whose fixed is a list": (["tune", "--space", write("f.yaml", "fixed: [1]\n" + space)],
                                          "fixed must be a mapping"),
        "a space with a number as a key": (["tune", "--space", write("k.yaml", space + "  1: {type: uniform}\n")],
                                           "a dimension's key must be a train-config key"),
        "a when: that names no value": (["tune", "--space", write("w.yaml", (
            "params:\n  optim.name: {type: categorical, choices: [sgd, adam]}\n"
            "  optim.momentum: {type: uniform, low: 0.0, high: 0.9, when: {optim.name: []}}\n"))], "names no value"),
        "best.json that is not an object": (["results", str(runs["best_str"])], "best.json: not a JSON object"),
        "a checkpoint field that is not text": (["export", "--checkpoint", str(runs["ckpt_int"]), "--out",
                                                 str(tmp_path / "m.pt")], "'checkpoint' is 5, not text"),
        "~user unknown in --storage": (["results", "~no_such_user_rs/runs/x"], "names a user this machine does not"),
        "~user unknown in --space": (["tune", "--space", "~no_such_user_rs/s.yaml"], "--space: '~no_such_user_rs"),
        "~user unknown in data.root": (["train", "--set", "data.name=imagefolder", "--set",
                                        "data.root=~no_such_user_rs/imgs"], "data.root: '~no_such_user_rs"),
        "a name longer than allowed": (["export", "--checkpoint", str(tmp_path / ("c" * 300)), "--out",
                                        str(tmp_path / "m.pt")], "longer than a path may be"),
        "a negative data seed": (["train", "--cv", "2", "--set", "data.seed=-3"], "data.seed: -3"),
        "a seed Optuna cannot take": (["tune", "--space", "digits_cnn", "--seed", str(2**32)], "--seed: 4294967296"),
        "a synthetic set too big to make": (["train", "--set", "data.name=synthetic", "--set", "data.image_size=4096"],
                                            "GiB while they are made"),
        "a job address with a port out of range": (["jobs", "list", "--address", "http://127.0.0.1:99999"],
                                                   "not a valid address (Port out of range"),
        "a Ray address that names no host": (["serve", "status", "--address", "ray://"], "names no host"),
        "export to a directory": (["export", "--checkpoint", str(runs["ckpt_int"]), "--out", str(tmp_path)],
                                  "is a directory; give a file name"),
        "predict under a file": (["predict", "--checkpoint", str(runs["ckpt_int"]), "--data", "digits", "--out",
                                  write("afile", "x") + "/p.parquet"], "is a file, so"),
        "a body limit past 1 GiB": (["serve", "--checkpoint", "x", "--max-body-mb", "1e308"], "--max-body-mb: "),
        "a host with a NUL byte": (["serve", "--checkpoint", "x", "--host", "a\0b"], "--host: 'a\\x00b'"),
        "an empty --config": (["train", "--config", ""], "--config: an empty path"),
        "storage with URI options": (["tune", "--space", "digits_cnn", "--storage", "s3://b/runs?region=x"],
                                     "a URI with options ('?...') cannot take a run name"),
        "a folder of one class": (["train", "--set", "data.name=imagefolder", "--set",
                                   f"data.root={tmp_path / 'one_class'}"], "has 1 class (cat); a classifier needs"),
        "--max-epochs past the epoch bound": (["tune", "--space", "digits_cnn", "--max-epochs", "20000"],
                                              "--max-epochs: 20000 must lie in 1..10000"),
    }


@pytest.mark.parametrize("case", ["a date no calendar has", "a tag its text cannot build", "a FIFO as --config",
                                  "a FIFO as --price", "a price file nested too deep", "a price file with a bad date",
                                  "an int of 400 digits as a float", "a space whose metric is a list",
                                  "a space whose fixed is a list", "a space with a number as a key",
                                  "a when: that names no value", "best.json that is not an object",
                                  "a checkpoint field that is not text", "~user unknown in --storage",
                                  "~user unknown in --space", "~user unknown in data.root",
                                  "a name longer than allowed", "a negative data seed", "a seed Optuna cannot take",
                                  "a synthetic set too big to make", "a job address with a port out of range",
                                  "a Ray address that names no host", "export to a directory", "predict under a file",
                                  "a body limit past 1 GiB", "a host with a NUL byte", "parquet labels that are text",
                                  "a corrupt CIFAR-10 archive", "a key given twice", "a price file with a key given twice",
                                  "results of a bucket, not a run", "convert to a size past 4096",
                                  "an empty --config", "--max-epochs past the epoch bound", "a folder of one class",
                                  "storage with URI options"])
def test_probed_inputs_give_exit_2_naming_what_is_wrong(case, tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.delenv("RAYSWEEP_TRACEBACK", raising=False)
    argv, expected = _probed_inputs(tmp_path)[case]
    code, err = run_cli_in(tmp_path, argv, capsys)
    assert code == 2 and expected in err and "unexpected error" not in err and "Traceback" not in err, err


def test_gcs_storage_without_credentials_is_refused_in_seconds(tmp_path, capsys, no_ray, monkeypatch):
    """Arrow's GCS client retries for 15 minutes by default: a machine without credentials or
    network hung the storage check that long. Here (no network) it must answer in seconds."""
    monkeypatch.delenv("RAYSWEEP_TRACEBACK", raising=False)
    start = time.monotonic()
    code, err = run_cli(["train", "--storage", "gs://raysweep-no-such-bucket/runs"], capsys)
    assert code == 2 and "--storage gs://raysweep-no-such-bucket/runs: cannot be read" in err, err
    assert time.monotonic() - start < 90


def _broken_checkpoints(tmp_path) -> dict[str, tuple[str, str]]:
    """A good checkpoint's state with one part of its meta (or its weights) made wrong."""
    import copy

    import torch

    from trainers.checkpoints import save_state
    from trainers.config import ModelConfig, TrainRunConfig
    from trainers.models import build_model

    net = build_model(ModelConfig(name="simple_cnn"), 1, 8, 3)
    good = {"model": net.state_dict(), "epoch": 1,
            "meta": {"config": TrainRunConfig.from_dict({"model": {"name": "simple_cnn"}}).to_dict(),
                     "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.2], "image_shape": [1, 8, 8]}}
    changes = {
        "classes a number": (lambda st: st["meta"].update(classes=5), "meta.classes 5"),
        "image_shape too short": (lambda st: st["meta"].update(image_shape=[1, 8]), "meta.image_shape [1, 8]"),
        "image_shape huge": (lambda st: st["meta"].update(image_shape=[1, 10**6, 10**6]), "meta.image_shape"),
        "mean a string": (lambda st: st["meta"].update(mean="x"), "meta.mean 'x'"),
        "preprocess a list": (lambda st: st["meta"].update(preprocess=[1]), "meta.preprocess [1]"),
        "config a list": (lambda st: st["meta"].update(config=[1, 2]), "meta.config [1, 2]"),
        "config invalid": (lambda st: st["meta"]["config"]["train"].update(epochs="x"), "meta.config is not a valid"),
        "weights of another shape": (lambda st: st["meta"].update(classes=["a", "b"]), "weights do not fit"),
        "model not a state dict": (lambda st: st.update(model=[1]), "model [1] is not a state dict"),
    }
    out = {}
    for i, (case, (change, expected)) in enumerate(changes.items()):
        state = copy.deepcopy(good)
        change(state)
        out[case] = (str(save_state(state, tmp_path / f"ck{i}").parent), expected)
    torch.manual_seed(0)
    return out


@pytest.mark.parametrize("command", ["export", "predict"])
def test_a_checkpoint_whose_meta_or_weights_are_wrong_is_refused_naming_the_part(command, tmp_path, capsys,
                                                                                   monkeypatch):
    """export, predict and serve read checkpoints through one loader (``load_checkpoint``):
    the meta's shape and the weights' fit are checked there, before any Ray actor."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("reached Ray"))
    monkeypatch.delenv("RAYSWEEP_TRACEBACK", raising=False)
    for case, (ckpt, expected) in _broken_checkpoints(tmp_path).items():
        extra = ["--data", "digits"] if command == "predict" else []
        code, err = run_cli([command, "--checkpoint", ckpt, "--out", str(tmp_path / f"{case}.out"), *extra], capsys)
        assert code == 2 and expected in err and "unexpected error" not in err, (case, err)


def test_records_of_a_shape_raysweep_never_writes_are_refused_naming_the_run(tmp_path, capsys, monkeypatch):
    """results and report read raysweep's own tables and records; a field changed by hand is
    one clear refusal (exit 2), not a traceback from the code that used it."""
    import json

    monkeypatch.delenv("RAYSWEEP_TRACEBACK", raising=False)
    trials = pa.table({"trial_id": ["a"], "best_val_accuracy": [0.5]})  # no status column
    cases = {"costs": ({"best.json": {"cpu_seconds": "abc"}}, "results"),
             "config": ({"summary.json": {"config": "x"}}, "results"),
             "no_status": ({"best.json": {"metric": "val_accuracy", "mode": "max"}}, "report")}
    for name, (records, command) in cases.items():
        run = tmp_path / name
        run.mkdir()
        for file, record in records.items():
            (run / file).write_text(json.dumps(record))
        if "summary.json" in records:
            pq.write_table(pa.table({"epoch": [1], "val_accuracy": [0.5]}), run / "history.parquet")
        else:
            pq.write_table(trials, run / "trials.parquet")
        code, err = run_cli([command, str(run)], capsys)
        assert code == 2 and f"{run}: its tables or records are not as raysweep writes them" in err, (name, err)


@pytest.mark.parametrize("call, words", [
    (lambda raysweep, d: raysweep.train(5, storage=d), "config: 5 is neither"),
    (lambda raysweep, d: raysweep.train(overrides=5, storage=d), "overrides: 5 is neither"),
    (lambda raysweep, d: raysweep.tune("digits_cnn", trials="x", storage=d), "--trials (trials=): 'x' must be a whole"),
    (lambda raysweep, d: raysweep.tune("digits_cnn", objectives=5, storage=d), "--objectives (objectives=): 5 must"),
    (lambda raysweep, d: raysweep.tune("digits_cnn", seed=1.5, storage=d), "--seed (seed=): 1.5 must be a whole"),
])
def test_the_python_api_refuses_arguments_of_the_wrong_type(call, words, tmp_path, no_ray):
    """The API passes values as given: a wrong type is a ConfigError naming it, not a TypeError
    from deep inside, nor (for train's config) silently ignored."""
    import raysweep

    with pytest.raises(ConfigError) as err:
        call(raysweep, str(tmp_path))
    assert words in str(err.value)


def test_trial_lookups_and_resumes_refuse_tables_and_plans_raysweep_never_writes(tmp_path, capsys, no_ray,
                                                                                monkeypatch):
    monkeypatch.delenv("RAYSWEEP_TRACEBACK", raising=False)
    exp = tmp_path / "exp"
    exp.mkdir()
    pq.write_table(pa.table({"id": ["t1"]}), exp / "trials.parquet")  # no trial_id column
    code, err = run_cli(["export", "--checkpoint", str(exp), "--trial", "t1", "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and f"{exp}: its tables or records are not as raysweep writes them" in err, err
    from cluster.store import ResultsStore
    from cluster.tune_cv import CV_PLAN, keep_cv_plan

    store = ResultsStore(str(tmp_path), "exp")
    store.write_json(CV_PLAN, {"folds": "two"})
    with pytest.raises(ConfigError, match="cv.json: its folds and seed are not as raysweep writes them"):
        keep_cv_plan(store, types.SimpleNamespace(search=types.SimpleNamespace(cv=2, seed=0), resume=True), None, {})
