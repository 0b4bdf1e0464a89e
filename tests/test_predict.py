"""`raysweep predict` and `raysweep export` on a real local Ray (2 CPUs), from one short
digits run trained once for the module."""

import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import write_png

from cluster.cli import main
from trainers.config import DataConfig, TrainRunConfig
from trainers.data import load_data, write_parquet_images
from trainers.inference import inference_precision
from trainers.streaming import build_dataset, plan_stream


class NotWeights:
    """A custom class: a checkpoint holding one needs arbitrary unpickling."""


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """A 3-epoch digits run with flip test-time augmentation: (run directory, its summary,
    its test split, class names)."""
    storage = tmp_path_factory.mktemp("runs")
    assert main(["train", "--workers", "1", "--storage", str(storage), "--name", "d", "--set", "train.epochs=3",
                 "--set", "train.tta=flip"]) == 0
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
    with warnings.catch_warnings(record=True) as seen:  # issue #19: and a streamed read, built (not run)
        warnings.simplefilter("always")
        build_dataset(plan_stream(DataConfig(name="parquet", root=str(tmp_path / "clean.parquet"))), "train")
        code, printed = _predict(capsys, "--checkpoint", run_dir, "--data", f"parquet:{tmp_path / 'in.parquet'}",
                                 "--out", out, "--top-k", "3")
    assert code == 0
    repo = Path(__file__).resolve().parents[1]  # our packages only: a venv may live in the checkout
    packages = tuple(str(repo / name) + "/" for name in ("cluster", "trainers", "search_spaces", "raysweep"))
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen
            if issubclass(w.category, (DeprecationWarning, FutureWarning)) and w.filename.startswith(packages)]
    assert ours == []  # none of our Ray Data calls is deprecated
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
    (root / "stray").mkdir()  # a class folder the model does not know: predicted, without a label
    write_png(test.x[1], str(root / "stray" / "s.png"))
    out = tmp_path / "folder.parquet"
    code, printed = _predict(capsys, "--checkpoint", run_dir, "--data", f"imagefolder:{root}", "--out", out,
                             "--actors", "2", "--batch-size", "64")
    assert code == 0
    assert f"{_printed_accuracy(printed):.4f}" == f"{summary['test_accuracy']:.4f}"
    metrics = json.loads((tmp_path / "folder.metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    # The header's labelled count is the metrics': the unreadable labelled file is in both, and said so.
    n = len(test)
    assert f"({n + 1} labelled)" in printed and metrics["labelled"] == n + 1 and metrics["scored"] == n
    assert f"over {n} of {n + 1} labelled inputs; 1 of them not predicted" in printed
    assert "class folder(s) ['stray'] are not classes of the model" in printed and "--unknown-classes" in printed
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == len(test) + 4  # every file, one row each
    stray = rows[str(root / "stray" / "s.png")]
    assert stray["label"] is None and stray["error"] is None and stray["pred_class"] in classes
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


@pytest.mark.smoke
def test_tune_experiment_uses_its_best_trial_on_the_digits_test_split(run, tuned):
    run_dir, summary, test, classes = run
    code, printed, rows = tuned
    assert code == 0
    assert "tune experiment's best trial" in printed and summary["checkpoint"] in printed
    # predict follows the checkpoint's train.tta (flip), as summary.json's test evaluation did
    assert "test-time augmentation flip," in printed
    assert f"{_printed_accuracy(printed):.4f}" == f"{summary['test_accuracy']:.4f}"
    assert len(rows) == len(test) and [r["label"] for r in rows] == test.y.tolist()


def test_summary_test_accuracy_is_the_checkpoints_flip_tta_accuracy(run):
    from trainers.checkpoints import load_state, model_from_state
    from trainers.inference import inference_precision
    from trainers.loop import autocast_for
    from trainers.tta import TTA

    _, summary, test, _ = run
    model, cfg, _ = model_from_state(load_state(summary["checkpoint"]))
    assert cfg.train.tta == "flip"
    with torch.no_grad(), autocast_for(inference_precision(cfg, "cpu"), torch.device("cpu")):
        logits = TTA["flip"](model.net, model.prepare(test.x))
    assert summary["test_accuracy"] == pytest.approx(float((logits.argmax(1) == test.y).float().mean()))


def test_export_loads_in_plain_pytorch_and_predicts_the_same(run, tuned, tmp_path, capsys):
    run_dir, summary, test, classes = run
    model = tmp_path / "model.pt"
    capsys.readouterr()
    assert main(["export", "--checkpoint", summary["checkpoint"], "--out", str(model)]) == 0
    assert "(test-time augmentation flip)" in capsys.readouterr().out  # the checkpoint's, as predict's
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
                          "tta": json.loads(extra["meta.json"])["tta"],
                          "raysweep_loaded": [k for k in sys.modules if k.split(".")[0] in ("trainers", "cluster")]}}))
    """)
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["raysweep_loaded"] == [] and got["classes"] == classes == got["extra"]
    assert got["shape"] == list(test.x.shape[1:]) and got["tta"] == "flip"
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
    for command in (["predict", "--data", "digits"], ["export"]):  # argparse: exit 2, the choices listed
        with pytest.raises(SystemExit) as e:
            main([*command, "--checkpoint", str(run_dir), "--out", out, "--tta", "mirror"])
        assert e.value.code == 2 and "--tta: invalid choice: 'mirror'" in capsys.readouterr().err
    (tmp_path / "pets" / "cats").mkdir(parents=True)
    (tmp_path / "pets" / "cats" / "x.png").write_bytes(b"")
    pets = ["--checkpoint", str(run_dir), "--data", f"imagefolder:{tmp_path / 'pets'}", "--out", out]
    assert main(["predict", *pets, "--unknown-classes", "error"]) == 2
    assert "['cats'] are not classes of the model" in capsys.readouterr().err
    assert main(["predict", *pets, "--unknown-classes", "skip"]) == 2
    assert "no .jpg/.jpeg/.png/.bmp/.webp files to predict" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_checkpoint_found_through_a_file_uri(run):
    from cluster.predict_cmd import load_checkpoint

    run_dir, summary, _, classes = run
    state, where, how = load_checkpoint(f"file://{run_dir}")
    assert where == f"file://{summary['checkpoint']}" and how == "the train run's best checkpoint"
    assert set(state) == {"model", "meta"} and state["meta"]["classes"] == classes


def test_named_data_set_of_another_size_gives_error_rows_and_no_ray_error_line(run, ray_local, tmp_path):
    """`--data synthetic` (3x16x16, other class names) on the digits model (1x8x8, no
    data.image_size): one error row per image, not a failed job; in a fresh driver process
    (joining the module's Ray) so that its stderr shows what a user sees."""
    import os

    run_dir, _, _, _ = run
    out = tmp_path / "syn.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "cluster", "predict", "--checkpoint", str(run_dir), "--data", "synthetic",
                           "--out", str(out), "--address", ray_local.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stdout + done.stderr  # ran; no input could be predicted
    assert "constructor arguments in the object store" not in done.stderr
    assert "Traceback" not in done.stderr
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 400 and all("3x16x16" in r["error"] and "1x8x8" in r["error"] for r in rows)
    assert all(r["label"] is None and r["pred_index"] is None for r in rows)  # its classes are not the model's


# -- plain functions, no Ray -----------------------------------------------------------------


def _batch(n: int, errors=()) -> dict:
    import numpy as np

    err = np.array(["broken" if i in errors else "" for i in range(n)], dtype=object)
    return {"id": np.array([f"x{i}" for i in range(n)], dtype=object), "label": np.arange(n) % 2,
            "pred_index": np.zeros(n, dtype=np.int64), "topk_index": np.zeros((n, 1), dtype=np.int64),
            "topk_probs": np.ones((n, 1), dtype=np.float32), "error": err}


def test_rows_are_counted_before_the_output_is_published(tmp_path):
    from cluster.predict_report import PredictError, output_schema, write_predictions

    out = tmp_path / "p.parquet"
    out.write_bytes(b"an earlier output")
    schema = output_schema("ckpt", ["a", "b"])
    with pytest.raises(PredictError, match="3 rows for 4 inputs"):
        write_predictions([_batch(2), _batch(1)], out, schema, ["a", "b"], expected=4)
    assert out.read_bytes() == b"an earlier output" and sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]
    tally = write_predictions([_batch(3, errors={1}), _batch(1)], out, schema, ["a", "b"], expected=4)
    assert pq.read_table(out).num_rows == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]
    assert (tally.labelled, tally.scored, tally.labelled_errors, tally.errors) == (4, 3, 1, 1)


def test_fractional_cpus_per_actor_count_every_actor_that_fits():
    from cluster.predict_cmd import PredictRequest, default_actors, how_many

    assert how_many(1.0, 0.1) == 10 and how_many(2.0, 0.5) == 4 and how_many(0.9, 1.0) == 0
    # Half of 1 CPU at 0.1 each: 5 actors (1.0 // 0.2 is 4.0 in floats).
    assert default_actors(1.0, 0, PredictRequest("c", "digits", Path("o.parquet"), cpus_per_actor=0.1)) == 5


def test_parquet_classes_the_model_lacks_follow_unknown_classes(tmp_path):
    import numpy as np

    from cluster.predict_inputs import plan_inputs
    from trainers.data import DataError
    from trainers.predict_readers import read_row_groups

    images = torch.zeros(6, 1, 8, 8, dtype=torch.uint8)
    write_parquet_images(tmp_path / "in.parquet", images, torch.tensor([0, 1, 2, 2, 1, 0]), ["b", "zebra", "a"])
    meta, spec = {"classes": ["a", "b"]}, f"parquet:{tmp_path / 'in.parquet'}"
    with pytest.raises(DataError, match=r"\['zebra'\] are not classes of the model"):
        plan_inputs(spec, meta, None, "error")
    for unknown, count, labels in (("unlabelled", 6, [1, -1, 0, 0, -1, 1]), ("skip", 4, [1, 0, 0, 1])):
        inputs = plan_inputs(spec, meta, None, unknown)
        assert inputs.count == count and inputs.labelled == 4 and "zebra" in inputs.notes[0]
        cols = {k: np.array([i[k] for i in inputs.items]) for k in inputs.items[0]}
        rows = read_row_groups(cols, inputs.label_maps)
        assert rows["label"].tolist() == labels and len(rows["id"]) == count
    assert rows["id"][1] == f"{tmp_path / 'in.parquet'}#2"  # rows keep their place in the file


def test_images_are_brought_to_the_model_by_its_own_preprocessing():
    import numpy as np

    from trainers.predict_readers import conform_rows, decode_rows, evaluation_spec

    batch = {"id": np.array(["a", "b"], dtype=object), "label": np.array([0, -1]),
             "image": np.full((2, 3, 16, 12), 200, dtype=np.uint8)}
    refused = conform_rows(batch, evaluation_spec([1, 8, 8]))
    assert all("3x16x12" in e and "1x8x8" in e for e in refused["error"])
    resized = conform_rows(batch, evaluation_spec([1, 8, 8], [8, 8]))
    assert list(resized["error"]) == ["", ""] and resized["image"].shape == (2, 1, 8, 8)
    assert (resized["image"] == 200).all()
    png = write_png_bytes(torch.full((3, 20, 10), 7, dtype=torch.uint8))
    encoded = {"id": np.array(["p", "q"], dtype=object), "label": np.array([0, 0]),
               "bytes": np.array([png, b"junk"], dtype=object), "error": np.array(["", ""], dtype=object)}
    out = decode_rows(encoded, evaluation_spec([1, 8, 8], [8, 8]))
    assert out["error"][0] == "" and (out["image"][0] == 7).all() and "not a readable image" in out["error"][1]


def write_png_bytes(img: torch.Tensor) -> bytes:
    from torchvision.io import encode_png

    return encode_png(img).numpy().tobytes()
