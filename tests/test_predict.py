"""`raysweep predict` and `raysweep export` on a real local Ray (2 CPUs), from one short
digits run trained once for the module."""

import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import write_png

from cluster.cli import main
from trainers.config import TrainRunConfig
from trainers.data import load_data, write_parquet_images
from trainers.inference import inference_precision


class NotWeights:
    """A custom class: a checkpoint holding one needs arbitrary unpickling."""


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """A 3-epoch digits run: (run directory, its summary, its test split, class names)."""
    storage = tmp_path_factory.mktemp("runs")
    assert main(["train", "--workers", "1", "--storage", str(storage), "--name", "d", "--set", "train.epochs=3"]) == 0
    summary = json.loads((storage / "d" / "summary.json").read_text())
    data = load_data(TrainRunConfig.from_dict(summary["config"]).data)
    return storage / "d", summary, data.test, data.classes


def _printed_accuracy(out: str) -> float:
    return float(re.search(r"metrics\s+accuracy (\d\.\d+)", out).group(1))


def _predict(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["predict", *map(str, argv)])
    return code, capsys.readouterr().out


def test_parquet_input_with_a_corrupt_row(run, tmp_path, capsys):
    run_dir, summary, test, classes = run
    write_parquet_images(tmp_path / "clean.parquet", test.x, test.y, classes)
    table = pq.read_table(tmp_path / "clean.parquet")
    corrupt = pa.table({"image": pa.array([b"\x89PNG but not really"], pa.binary()),
                        "label": pa.array([3], table.schema.field("label").type)})
    pq.write_table(pa.concat_tables([table, corrupt]).replace_schema_metadata(table.schema.metadata),
                   tmp_path / "in.parquet", row_group_size=100)  # 4 row groups: 4 work items
    out = tmp_path / "preds.parquet"
    code, printed = _predict(capsys, "--checkpoint", run_dir, "--data", f"parquet:{tmp_path / 'in.parquet'}",
                             "--out", out, "--top-k", "3")
    assert code == 0
    n = len(test)
    assert f"{round(summary['test_accuracy'], 4):.4f}" == f"{_printed_accuracy(printed):.4f}"
    metrics = json.loads((tmp_path / "preds.metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    for key in ("precision", "recall", "f1"):
        assert metrics[key] == pytest.approx(summary[f"test_{key}"], abs=1e-9)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == n + 1 and metrics["scored"] == n and metrics["errors"] == 1
    assert [r["id"] for r in rows] == [f"{tmp_path / 'in.parquet'}#{i}" for i in range(n + 1)]  # input order
    bad = rows[-1]
    assert "not a readable image" in bad["error"] and bad["label"] == 3 and bad["pred_index"] is None
    good = rows[0]
    assert good["error"] is None and good["label"] == int(test.y[0]) and good["pred_class"] == classes[good["pred_index"]]
    assert len(good["topk_classes"]) == 3 and good["topk_classes"][0] == good["pred_class"]
    assert good["topk_probs"] == sorted(good["topk_probs"], reverse=True) and 0 < sum(good["topk_probs"]) <= 1 + 1e-6
    assert (tmp_path / "preds.confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_image_folder_with_corrupt_and_wrong_size_files(run, tmp_path, capsys):
    run_dir, summary, test, classes = run
    root = tmp_path / "images"
    for i, (x, y) in enumerate(zip(test.x, test.y)):
        (root / classes[y]).mkdir(parents=True, exist_ok=True)
        write_png(x, str(root / classes[y] / f"{i:04d}.png"))
    (root / "3" / "broken.png").write_bytes(b"this is no image")
    write_png(torch.zeros(3, 16, 16, dtype=torch.uint8), str(root / "unlabelled_rgb.png"))
    write_png(test.x[0], str(root / "unlabelled_ok.png"))
    out = tmp_path / "folder.parquet"
    code, printed = _predict(capsys, "--checkpoint", run_dir, "--data", f"imagefolder:{root}", "--out", out,
                             "--actors", "2", "--batch-size", "64")
    assert code == 0
    assert f"{_printed_accuracy(printed):.4f}" == f"{summary['test_accuracy']:.4f}"
    assert json.loads((tmp_path / "folder.metrics.json").read_text())["accuracy"] == pytest.approx(
        summary["test_accuracy"], abs=1e-12)
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == len(test) + 3  # every file, one row each
    assert "not a readable image" in rows[str(root / "3" / "broken.png")]["error"]
    wrong = rows[str(root / "unlabelled_rgb.png")]
    assert "3x16x16" in wrong["error"] and "1x8x8" in wrong["error"] and wrong["label"] is None
    ok = rows[str(root / "unlabelled_ok.png")]
    assert ok["error"] is None and ok["label"] is None and ok["pred_class"] in classes
    assert sum(r["error"] is not None for r in rows.values()) == 2


@pytest.fixture(scope="module")
def tuned(run, tmp_path_factory):
    """`predict --data digits` of a tune experiment (a hand-made best.json naming the run's
    checkpoint): (exit code, what it printed, output rows)."""
    run_dir, summary, test, classes = run
    experiment = tmp_path_factory.mktemp("tune-x")
    (experiment / "best.json").write_text(json.dumps({"trial_id": "t1", "checkpoint": summary["checkpoint"]}))
    out = experiment / "tuned.parquet"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["predict", "--checkpoint", str(experiment), "--data", "digits", "--out", str(out), "--top-k", "10"])
    return code, printed.getvalue(), pq.read_table(out).to_pylist() if code == 0 else []


def test_tune_experiment_uses_its_best_trial_on_the_digits_test_split(run, tuned):
    run_dir, summary, test, classes = run
    code, printed, rows = tuned
    assert code == 0
    assert "tune experiment's best trial" in printed and summary["checkpoint"] in printed
    assert f"{_printed_accuracy(printed):.4f}" == f"{summary['test_accuracy']:.4f}"
    assert len(rows) == len(test) and [r["label"] for r in rows] == test.y.tolist()


def test_export_loads_in_plain_pytorch_and_predicts_the_same(run, tuned, tmp_path, capsys):
    run_dir, summary, test, classes = run
    model = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", summary["checkpoint"], "--out", str(model)]) == 0
    # The export is fp32; so was `predict` above wherever the run's precision resolves to fp32.
    predicted = tuned[2]
    if inference_precision(TrainRunConfig.from_dict(summary["config"]), "cpu") != "fp32":
        code, _ = _predict(capsys, "--checkpoint", run_dir, "--data", "digits", "--out", tmp_path / "p.parquet",
                           "--precision", "fp32", "--top-k", "10")
        assert code == 0
        predicted = pq.read_table(tmp_path / "p.parquet").to_pylist()
    # The same images through the exported file, in a fresh interpreter that cannot import raysweep.
    torch.save(test.x.clone(), tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import json, sys
        class NoRaysweep:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("trainers", "cluster", "search_spaces"):
                    raise ImportError("raysweep is not importable here")
        sys.meta_path.insert(0, NoRaysweep())
        import torch
        extra = {{"classes.json": "", "meta.json": ""}}
        m = torch.jit.load({str(model)!r}, _extra_files=extra)
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        probs = m(x)
        print(json.dumps({{"pred": probs.argmax(1).tolist(), "probs": probs.tolist(), "classes": list(m.classes),
                          "extra": json.loads(extra["classes.json"]),
                          "shape": json.loads(extra["meta.json"])["image_shape"],
                          "raysweep_loaded": [k for k in sys.modules if k.split(".")[0] in ("trainers", "cluster")]}}))
    """)
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["raysweep_loaded"] == [] and got["classes"] == classes == got["extra"]
    assert got["shape"] == list(test.x.shape[1:])
    assert got["pred"] == [r["pred_index"] for r in predicted]
    for row, probs in zip(predicted, got["probs"]):
        assert row["topk_probs"] == pytest.approx([probs[classes.index(c)] for c in row["topk_classes"]], abs=1e-5)


def test_a_checkpoint_that_needs_unpickling_is_refused(tmp_path, capsys):
    bad = tmp_path / "evil"
    bad.mkdir()
    torch.save({"model": {}, "meta": NotWeights()}, bad / "state.pt")
    for argv in (["predict", "--checkpoint", str(bad), "--data", "digits", "--out", str(tmp_path / "o.parquet")],
                 ["export", "--checkpoint", str(bad / "state.pt"), "--out", str(tmp_path / "m.pt")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "refusing to load" in err and "unpickling" in err
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "m.pt").exists()


def test_bad_requests_are_refused_before_any_work(run, tmp_path, capsys):
    run_dir, summary, _, _ = run
    failed = tmp_path / "failed-run"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed"}))
    out = str(tmp_path / "o.parquet")
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere"), "--data", "digits"], "no such file"),
        (["--checkpoint", str(failed), "--data", "digits"], "has no 'checkpoint'"),
        (["--checkpoint", str(tmp_path), "--data", "digits"], "neither state.pt"),
        (["--checkpoint", str(run_dir), "--data", "mnist"], "unknown data set 'mnist'"),
        (["--checkpoint", str(run_dir), "--data", f"imagefolder:{tmp_path / 'none'}"], "is not a directory"),
        (["--checkpoint", str(run_dir), "--data", "digits", "--top-k", "0"], "--top-k"),
    ]
    for argv, message in cases:
        assert main(["predict", *argv, "--out", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    (tmp_path / "pets" / "cats").mkdir(parents=True)
    (tmp_path / "pets" / "cats" / "x.png").write_bytes(b"")
    assert main(["predict", "--checkpoint", str(run_dir), "--data", f"imagefolder:{tmp_path / 'pets'}", "--out", out]) == 2
    assert "['cats'] are not classes of the model" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_checkpoint_found_through_a_file_uri(run):
    from cluster.predict_cmd import load_checkpoint

    run_dir, summary, _, classes = run
    state, where, how = load_checkpoint(f"file://{run_dir}")
    assert where == f"file://{summary['checkpoint']}" and how == "the train run's best checkpoint"
    assert set(state) == {"model", "meta"} and state["meta"]["classes"] == classes
