"""cifar10: time to accuracy on the real CIFAR-10 with the fast network (``fast_cifar``),
`raysweep train` (1 worker) against the plain loop of `overhead`, same recipe
(``examples/cifar10_fast.yaml``): test accuracy after every epoch against cumulative
training seconds. Target: >= 91% test accuracy within 10 epochs (flip test-time
augmentation allowed) with raysweep's epoch time <= 1.05x the plain loop's.

Both sides train on all 50,000 training images and score the 10,000 test images after
every epoch (raysweep's validation split is the test set here, so its per-epoch
``val_accuracy`` is test accuracy); the final models are also scored with flip TTA.
Data: ``$RAYSWEEP_CIFAR10`` or ``../shared/data/cifar10`` (``train.parquet``,
``test.parquet``); ``--smoke`` makes a tiny Parquet set instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import plain
from benchmarks.common import REPO, Result, local_ray, median, set_threads
from benchmarks.worker_timing import EventReader, epoch_times

TARGET_ACCURACY, TARGET_RATIO = 0.91, 1.05

SIZES = {
    "full": dict(train=None, test=None, epochs=10, overrides=[]),
    "quick": dict(train=10000, test=2000, epochs=4, overrides=[]),
    "smoke": dict(train=None, test=None, epochs=2, overrides=["train.batch_size=64"]),
}


def data_root() -> Path:
    return Path(os.environ.get("RAYSWEEP_CIFAR10") or REPO.parent / "shared" / "data" / "cifar10")


def tiny_parquet(directory: Path) -> Path:
    """A small generated stand-in in CIFAR-10's Parquet layout (JPEG, like the real copy)."""
    from trainers.config import DataConfig
    from trainers.data import DATASETS, write_parquet_images

    split, _, classes = DATASETS["synthetic"](DataConfig(name="synthetic", num_samples=320, image_size=16))
    write_parquet_images(directory / "train.parquet", split.x[:256], split.y[:256], classes, fmt="jpeg")
    write_parquet_images(directory / "test.parquet", split.x[256:], split.y[256:], classes, fmt="jpeg")
    return directory


def load(root: Path, n_train: int | None, n_test: int | None):
    """Both splits through raysweep's ``parquet`` loader; validation = the test split."""
    from trainers.config import DataConfig
    from trainers.data import DATASETS, ImageData, Split, channel_stats

    if not (root / "train.parquet").is_file():
        raise FileNotFoundError(f"no CIFAR-10 train.parquet under {root}; set RAYSWEEP_CIFAR10=DIR")
    start = time.perf_counter()
    train, test, classes = DATASETS["parquet"](DataConfig(name="parquet", root=str(root)))
    load_s = time.perf_counter() - start
    train = Split(train.x[:n_train], train.y[:n_train]) if n_train else train  # rows are in a seeded random order
    test = Split(test.x[:n_test], test.y[:n_test]) if n_test else test
    mean, std = channel_stats(train.x)
    return ImageData(train, test, test, classes, mean, std), load_s


def decode_list_seconds(root: Path) -> tuple[float, int]:
    """For comparison with the loader: torchvision's decode_jpeg on the whole list at once."""
    import pyarrow.parquet as pq
    from torchvision.io import decode_jpeg

    start, n = time.perf_counter(), 0
    for name in ("train.parquet", "test.parquet"):
        blobs = pq.read_table(root / name, columns=["image"]).column("image").to_pylist()
        torch.stack(decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]))
        n += len(blobs)
    return time.perf_counter() - start, n


def latest_state(run_dir: Path) -> dict:
    from trainers.checkpoints import load_state

    states = [load_state(p) for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    return max(states, key=lambda s: s["epoch"])


def raysweep_side(cfg, data, threads: int, storage: str, name: str) -> dict:
    import pyarrow.parquet as pq

    from cluster import train_cmd
    from trainers.checkpoints import model_from_state
    from trainers.distributed import Placement

    reader = EventReader()
    t0 = time.time()
    summary = train_cmd.run(train_cmd.TrainRequest(cfg, Placement(workers=1, cpus_per_worker=threads), storage, name),
                            data=data)
    if summary.get("status") != "completed":
        raise RuntimeError(f"raysweep train ended {summary.get('status')}: {summary.get('error')}")
    timing = epoch_times(reader.read())
    hist = pq.read_table(Path(storage) / name / "history.parquet").to_pylist()
    if not timing["train_seconds"]:  # no in-worker timing: history's figures
        timing["train_seconds"] = [len(data.train) / r["images_per_second"] for r in hist]
        timing["epoch_seconds"] = [r["epoch_seconds"] for r in hist]
    model, run_cfg, _ = model_from_state(latest_state(Path(storage) / name))
    fmt = torch.channels_last if run_cfg.train.channels_last else torch.contiguous_format
    net = model.net.to(memory_format=fmt)
    precision = plain.Recipe.from_config(run_cfg, _resolved(run_cfg)).precision
    tta = plain.accuracy(net, model.normalize, fmt, data.test, precision, tta=True)
    return {"accuracy": [r["val_accuracy"] for r in hist], "train_seconds": timing["train_seconds"],
            "epoch_seconds": timing["epoch_seconds"], "tta_accuracy": tta,
            "startup_seconds": timing["first_batch_t"] - t0 if timing.get("first_batch_t") else None,
            "threads": timing.get("threads"), "wall_seconds": time.time() - t0}


def plain_side(data, recipe, epochs: int) -> dict:
    t0 = time.time()
    out = plain.run(data, recipe, epochs, eval_split=data.test)
    rows = out["epochs"]
    return {"accuracy": [r["accuracy"] for r in rows], "train_seconds": [r["train_seconds"] for r in rows],
            "epoch_seconds": [r["epoch_seconds"] for r in rows],
            "tta_accuracy": out["plain"].evaluate(data.test, tta=True), "startup_seconds": out["startup_seconds"],
            "threads": [torch.get_num_threads()], "wall_seconds": time.time() - t0}


def _resolved(cfg) -> str:
    from trainers.loop import resolve_precision

    return resolve_precision(cfg.train.precision, torch.device("cpu"))


def _cumulative(xs):
    out, total = [], 0.0
    for x in xs:
        total += x
        out.append(total)
    return out


def run(mode: str = "full") -> Result:
    size = SIZES[mode]
    threads = set_threads()
    tmp = Path(tempfile.mkdtemp(prefix="raysweep-bench-cifar10-"))
    try:
        root = tiny_parquet(tmp) if mode == "smoke" else data_root()
        data, load_s = load(root, size["train"], size["test"])
        decode_s, decoded = decode_list_seconds(root)
        cfg = plain.example_config([f"data.root={root}", f"train.epochs={size['epochs']}"] + size["overrides"])
        precision = _resolved(cfg)
        recipe = plain.Recipe.from_config(cfg, precision)
        storage = str(tmp / "runs")
        with local_ray(threads):
            ours = raysweep_side(cfg, data, threads, storage, "cifar10")
        theirs = plain_side(data, recipe, size["epochs"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sides = {"raysweep": ours, "plain": theirs}
    for side in sides.values():
        side["cumulative_train_seconds"] = _cumulative(side["train_seconds"])
    steady = lambda s, k: s[k][1:] or s[k]  # epoch 1 is the warm-up
    ratio = median(steady(ours, "epoch_seconds")) / median(steady(theirs, "epoch_seconds"))
    train_ratio = median(steady(ours, "train_seconds")) / median(steady(theirs, "train_seconds"))
    value = ours["tta_accuracy"]
    rows = [[e + 1, ours["cumulative_train_seconds"][e], ours["accuracy"][e], theirs["cumulative_train_seconds"][e],
             theirs["accuracy"][e]] for e in range(size["epochs"])]
    rows.append(["final, flip TTA", None, ours["tta_accuracy"], None, theirs["tta_accuracy"]])
    n_train, n_test = len(data.train), len(data.test)
    notes = [
        f"{recipe.model}, {precision}, batch {recipe.batch_size}, lr {recipe.lr} one-cycle (warm-up "
        f"{recipe.warmup_epochs:g} epoch), Nesterov momentum {recipe.momentum}, label smoothing "
        f"{recipe.label_smoothing}, crop pad {recipe.crop_padding} + flip; {n_train} training / {n_test} test "
        f"images{' (generated)' if mode == 'smoke' else ''}; {threads} threads on both sides",
        f"epoch time (median of epochs 2..{size['epochs']}, evaluation included) raysweep / plain = {ratio:.3f} "
        f"(target <= {TARGET_RATIO}); training only {train_ratio:.3f}; raysweep ran first, then the plain loop",
        f"data: raysweep's parquet loader read + decoded {n_train if not size['train'] else '50000'}+"
        f"{n_test if not size['test'] else '10000'} images in {load_s:.1f} s; decode_jpeg on a list: "
        f"{decode_s:.1f} s for {decoded}",
    ]
    met = value >= TARGET_ACCURACY and ratio <= TARGET_RATIO
    return Result(
        name="cifar10", value=value, target=f">= {TARGET_ACCURACY} test accuracy in 10 epochs and epoch ratio "
                                           f"<= {TARGET_RATIO}",
        met=met, unit=f"test accuracy (raysweep, {size['epochs']} epochs, flip TTA)",
        headers=["epoch", "raysweep train s", "raysweep acc", "plain train s", "plain acc"], rows=rows, notes=notes,
        details={"epoch_ratio": ratio, "train_ratio": train_ratio, "sides": sides, "recipe": recipe.to_dict(),
                 "train_images": n_train, "test_images": n_test, "loader_seconds": load_s,
                 "decode_jpeg_list_seconds": decode_s, "threads": threads, "epochs": size["epochs"]},
    )
