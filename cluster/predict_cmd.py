"""`raysweep predict` (batch inference on Ray Data) and `raysweep export` (one TorchScript file).

predict: inputs -> Ray Data -> read + decode + check size -> a pool of model actors (CPU or
GPU) -> rows streamed back to the driver and written to one Parquet file. Every input gives
exactly one row; one that cannot be read, decoded or that has the wrong size/channels gets
its reason in ``error`` instead of a prediction. Where labels exist the driver also prints
accuracy and macro precision/recall/F1 and draws the confusion matrix next to the output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.cli import EXIT_BAD_REQUEST, EXIT_FAILED, EXIT_OK, add_common, command
from trainers.checkpoints import STATE_FILE, CheckpointError, load_state
from trainers.data import DATASETS, IMAGE_SUFFIXES, DataError, decode_classes, decode_image, load_data
from trainers.streaming import list_parquet
from trainers.uris import as_uri, file_info, open_location, open_parquet, read_bytes
from trainers.inference import (EXPORT_FORMATS, InferenceError, check_state, classifier_from_state,
                                inference_precision, predict, shape_problem)

NO_LABEL = -1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Inputs that are streamed file by file (or row group by row group); every other registered
# data set name is loaded whole, like training does, and its test split is predicted.
STREAMED = ("imagefolder", "parquet")


# -- which checkpoint -------------------------------------------------------------------


def _fs_and_path(spec: str):
    import pyarrow.fs as pafs

    if "://" in spec:
        return pafs.FileSystem.from_uri(spec)
    return pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())


def resolve_checkpoint(spec: str) -> tuple[str, str]:
    """``--checkpoint`` -> (checkpoint directory or state.pt, how it was found).

    A checkpoint directory or ``state.pt``; a train run (``summary.json``'s ``checkpoint``,
    its best); a tune experiment (``best.json``'s ``checkpoint``, the best trial's). Local
    paths or pyarrow.fs URIs.
    """
    import pyarrow.fs as pafs

    fs, path = _fs_and_path(spec)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InferenceError(f"--checkpoint {spec!r}: no such file or directory")
    if info.type == pafs.FileType.File:
        return as_uri(spec, path), "checkpoint file"
    if fs.get_file_info(f"{path}/{STATE_FILE}").type == pafs.FileType.File:
        return as_uri(spec, path), "checkpoint directory"
    for name, what in (("best.json", "the tune experiment's best trial"), ("summary.json", "the train run's best checkpoint")):
        if fs.get_file_info(f"{path}/{name}").type != pafs.FileType.File:
            continue
        with fs.open_input_stream(f"{path}/{name}") as f:
            record = json.loads(f.read())
        ckpt = record.get("checkpoint")
        if not ckpt:
            raise InferenceError(
                f"--checkpoint {spec!r}: {name} has no 'checkpoint' (status {record.get('status', '?')!r}); "
                "the run saved no usable checkpoint: point --checkpoint at a checkpoint_*/ directory instead")
        if "://" not in ckpt and not os.path.isabs(ckpt) and "://" not in spec:
            ckpt = str(Path(path) / ckpt)  # relative to the experiment directory
        return as_uri(spec, ckpt), what
    raise InferenceError(
        f"--checkpoint {spec!r}: holds neither {STATE_FILE}, summary.json (a train run) nor best.json "
        "(a tune experiment); give a checkpoint_*/ directory, a run directory or an experiment directory")


def load_checkpoint(spec: str) -> tuple[dict, str, str]:
    """(weights-only state holding only 'model' and 'meta', checkpoint location, how found)."""
    where, how = resolve_checkpoint(spec)
    if "://" in where:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(where)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            path = f"{path}/{STATE_FILE}"
        with tempfile.TemporaryDirectory() as tmp, fs.open_input_stream(path) as f:
            local = Path(tmp) / STATE_FILE
            local.write_bytes(f.read())
            state = load_state(local)
    else:
        state = load_state(where)
    check_state(state)
    return {"model": state["model"], "meta": state["meta"]}, where, how


# -- inputs -----------------------------------------------------------------------------


@dataclass
class Inputs:
    """What to predict, planned on the driver before any Ray process starts."""

    kind: str  # files | parquet | memory
    items: list[dict]
    count: int
    labelled: int  # inputs with a known label
    describe: str
    notes: list[str] = field(default_factory=list)


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    name, _, path = spec.partition(":")
    known = DATASETS.names()
    if name not in known:
        raise DataError(f"--data {spec!r}: unknown data set {name!r}; known: {', '.join(known)} (NAME[:PATH])")
    if name in STREAMED and not path:
        return name, None
    return name, path or None


def plan_inputs(spec: str, meta: dict, data_cfg) -> Inputs:
    name, path = parse_data_spec(spec)
    classes = [str(c) for c in meta["classes"]]
    if name == "imagefolder" and path:
        return _folder_inputs(path, classes, spec)
    if name == "parquet" and path:
        return _parquet_inputs(path, classes, spec)
    return _memory_inputs(name, path, classes, data_cfg, spec)


def _entries(fs, path: str) -> list:
    import pyarrow.fs as pafs

    return sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda e: e.path)


def _folder_inputs(root: str, classes: list[str], spec: str) -> Inputs:
    """``root/<class>/*.png`` (labelled by folder name) and/or ``root/*.png`` (unlabelled);
    ``root`` a local path or a pyarrow.fs URI."""
    import pyarrow.fs as pafs

    fs, base = open_location(root, "--data")
    if file_info(fs, base, root, "--data").type != pafs.FileType.Directory:
        raise DataError(f"--data {spec!r}: {root!r} is not a directory")
    index = {c: i for i, c in enumerate(classes)}
    top = _entries(fs, base)
    folders = [e for e in top if e.type == pafs.FileType.Directory]
    unknown = [d.base_name for d in folders if d.base_name not in index]
    if unknown:
        raise DataError(
            f"--data {spec!r}: class folder(s) {unknown} are not classes of the model {classes}; "
            "rename them, or move their images to the top folder to predict them unlabelled")
    items, skipped = [], 0
    for entries, label in [(top, NO_LABEL)] + [(_entries(fs, d.path), index[d.base_name]) for d in folders]:
        for e in entries:
            if e.type != pafs.FileType.File:
                continue
            if Path(e.base_name).suffix.lower() in IMAGE_SUFFIXES:
                items.append({"id": as_uri(root, e.path), "label": label})
            else:
                skipped += 1
    if not items:
        raise DataError(f"--data {spec!r}: no {'/'.join(IMAGE_SUFFIXES)} files in {root!r} or its class folders")
    notes = [f"ignored {skipped} file(s) without an image suffix"] if skipped else []
    labelled = sum(i["label"] != NO_LABEL for i in items)
    return Inputs("files", items, len(items), labelled, f"imagefolder {root}", notes)


def _parquet_inputs(root: str, classes: list[str], spec: str) -> Inputs:
    """Parquet file(s) with an encoded ``image`` column, ``label`` optional; one work item per
    row group. ``root`` a file or folder, local or a pyarrow.fs URI."""
    import pyarrow.compute as pc

    try:
        files = [as_uri(root, f) for f in list_parquet(root).files]
    except DataError:
        raise DataError(f"--data {spec!r}: no Parquet file at {root!r}") from None
    items, count, labelled = [], 0, 0
    for f in files:
        try:
            pfile = open_parquet(f)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"--data {spec!r}: {f} is not a readable Parquet file ({e})") from None
        names = pfile.schema_arrow.names
        if "image" not in names:
            raise DataError(f"--data {spec!r}: {f} has no 'image' column (found {names}); it needs encoded images there")
        label_map = None
        if "label" in names:
            label_map = _label_map(pfile.schema_arrow.metadata or {}, classes, f)
            labels = pfile.read(columns=["label"]).column("label")
            valid = pc.drop_null(labels).to_numpy()
            top = len(label_map) if label_map is not None else len(classes)
            if len(valid) and (valid.min() < 0 or valid.max() >= top):
                raise DataError(f"--data {spec!r}: {f} has labels outside 0..{top - 1} (e.g. "
                                f"{int(valid[(valid < 0) | (valid >= top)][0])}); labels index the classes {classes}")
            labelled += len(valid)
        for g in range(pfile.num_row_groups):
            items.append({"file": f, "row_group": g, "first_row": count_in_file(pfile, g),
                          "label_map": label_map or []})
        count += pfile.metadata.num_rows
    return Inputs("parquet", items, count, labelled, f"parquet {root}")


def count_in_file(pfile, group: int) -> int:
    return sum(pfile.metadata.row_group(i).num_rows for i in range(group))


def _label_map(metadata: dict, classes: list[str], path: Path) -> list[int] | None:
    """File label -> model class index, where the file names its classes (``classes`` metadata)."""
    if b"classes" not in metadata:
        return None
    names = decode_classes(metadata[b"classes"].decode())
    missing = [n for n in names if n not in classes]
    if missing:
        raise DataError(f"{path}: classes {missing} (schema metadata) are not classes of the model {classes}")
    return [classes.index(n) for n in names]


def _memory_inputs(name: str, path: str | None, classes: list[str], data_cfg, spec: str) -> Inputs:
    """A registered data set's test split, exactly as training split it (the checkpoint's data config)."""
    cfg = data_cfg if name == data_cfg.name else type(data_cfg)(name=name, seed=data_cfg.seed)
    if path:
        cfg = dataclasses.replace(cfg, root=path)
    data = load_data(cfg)
    names = [str(c) for c in data.classes]
    notes = []
    if names == classes:
        labels = data.test.y.numpy()
    else:
        mapping = np.array([classes.index(n) if n in classes else NO_LABEL for n in names])
        labels = mapping[data.test.y.numpy()]
        notes.append(f"the data set's classes {names} differ from the model's; labels mapped by name")
    x = data.test.x.numpy()
    items = [{"id": f"{name}:test:{i}", "label": int(labels[i]), "pixels": x[i]} for i in range(len(x))]
    return Inputs("memory", items, len(items), int((labels != NO_LABEL).sum()),
                  f"{name} test split ({'data.root=' + path if path else 'the checkpoint data config'})", notes)


# -- Ray Data stages (run inside the model actors once Ray Data fuses them) -------------------


def _read_files(batch: dict) -> dict:
    data, errors = [], []
    for path in batch["id"]:
        try:
            data.append(read_bytes(path))
            errors.append("")
        except OSError as e:
            data.append(b"")
            errors.append(f"{path}: cannot read ({e.strerror or e})")
    return {"id": batch["id"], "label": batch["label"], "data": _objects(data), "error": np.array(errors, dtype=object)}


def _read_row_groups(batch: dict) -> dict:
    ids, labels, data, errors = [], [], [], []
    for file, group, first, label_map in zip(batch["file"], batch["row_group"], batch["first_row"], batch["label_map"]):
        pfile = open_parquet(file)
        cols = [c for c in ("image", "label", "id") if c in pfile.schema_arrow.names]
        table = pfile.read_row_group(int(group), columns=cols)
        n = table.num_rows
        group_ids = ([str(v) for v in table.column("id").to_pylist()] if "id" in cols
                     else [f"{file}#{first + i}" for i in range(n)])
        raw = table.column("label").to_pylist() if "label" in cols else [None] * n
        lm = [int(v) for v in label_map] if label_map is not None and len(label_map) else None
        labels += [NO_LABEL if v is None else (lm[v] if lm else int(v)) for v in raw]
        for source, blob in zip(group_ids, table.column("image").to_pylist()):
            data.append(blob or b"")
            errors.append("" if blob else f"{source}: empty image cell")
        ids += group_ids
    return {"id": np.array(ids, dtype=object), "label": np.array(labels, dtype=np.int64),
            "data": _objects(data), "error": np.array(errors, dtype=object)}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _decode(batch: dict, shape: tuple[int, ...], resize_hw: list[int] | None = None) -> dict:
    """Encoded bytes -> uint8 pixels of the model's shape; anything else becomes an error row.
    ``resize_hw``: the run's ``data.image_size`` (checkpoint ``meta["preprocess"]``): each
    image is resized exactly as the run's evaluation did, so any size it accepted fits."""
    import torch

    from trainers.preprocess import resize, to_channels

    pixels = np.zeros((len(batch["id"]), *shape), dtype=np.uint8)
    errors = list(batch["error"])
    for i, (source, blob) in enumerate(zip(batch["id"], batch["data"])):
        if errors[i]:
            continue
        try:
            img = decode_image(bytes(blob), str(source))
            if resize_hw:
                img = resize(to_channels(img, shape[0]), resize_hw)
        except (DataError, RuntimeError, ValueError) as e:  # torchvision's for images it cannot resize
            errors[i] = str(e) if isinstance(e, DataError) else f"{source}: {e}"
            continue
        problem = shape_problem(img, shape)
        if problem:
            errors[i] = f"{source}: {problem}"
        else:
            pixels[i] = torch.as_tensor(img).numpy()
    return {"id": batch["id"], "label": batch["label"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class Predictor:
    """One model replica in Ray Data's actor pool: uint8 pixels -> prediction and top-k."""

    def __init__(self, state, device: str, top_k: int, precision: str | None, threads: int):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        state = ray.get(state[0])  # the weights, put once by the driver
        self.clf, cfg = classifier_from_state(state, device)
        self.precision = inference_precision(cfg, device, precision)
        self.k = min(top_k, len(self.clf.classes))

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["id"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        pred = np.full(n, NO_LABEL, dtype=np.int64)
        top_idx = np.full((n, self.k), NO_LABEL, dtype=np.int64)
        top_p = np.full((n, self.k), np.nan, dtype=np.float32)
        if ok.any():
            p, i, v = predict(self.clf, torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])), self.k, self.precision)
            pred[ok], top_idx[ok], top_p[ok] = p.cpu().numpy(), i.cpu().numpy(), v.cpu().numpy()
        return {"id": batch["id"], "label": batch["label"], "pred_index": pred,
                "topk_index": top_idx, "topk_probs": top_p, "error": batch["error"]}


@dataclass(frozen=True)
class PredictRequest:
    checkpoint: str
    data: str
    out: Path
    batch_size: int = 256
    top_k: int = 5
    use_gpu: bool = False
    actors: int | None = None
    cpus_per_actor: float = 1.0
    precision: str | None = None
    address: str | None = None

    def problems(self) -> list[str]:
        out = []
        if self.batch_size < 1:
            out.append(f"--batch-size: {self.batch_size} must be >= 1")
        if self.top_k < 1:
            out.append(f"--top-k: {self.top_k} must be >= 1")
        if self.actors is not None and self.actors < 1:
            out.append(f"--actors: {self.actors} must be >= 1")
        if self.cpus_per_actor <= 0:
            out.append(f"--cpus-per-actor: {self.cpus_per_actor} must be > 0")
        if self.out.is_dir():
            out.append(f"--out: {str(self.out)!r} is a directory; give a file name such as predictions.parquet")
        return out


def build_dataset(inputs: Inputs, shape: tuple[int, ...], req: PredictRequest, state_ref, actors: int,
                  resize_hw: list[int] | None = None):
    import ray.data

    blocks = max(1, min(200, len(inputs.items) if inputs.kind == "parquet" else math.ceil(inputs.count / req.batch_size)))
    ds = ray.data.from_items(inputs.items, override_num_blocks=blocks)
    if inputs.kind == "files":
        ds = ds.map_batches(_read_files, batch_format="numpy", batch_size=req.batch_size)
    elif inputs.kind == "parquet":
        ds = ds.map_batches(_read_row_groups, batch_format="numpy", batch_size=1)
    if inputs.kind != "memory":
        ds = ds.map_batches(_decode, batch_format="numpy", batch_size=req.batch_size, fn_kwargs={"shape": shape, "resize_hw": resize_hw})
    else:
        ds = ds.map_batches(_with_error_column, batch_format="numpy", batch_size=req.batch_size)
    return ds.map_batches(
        Predictor, batch_format="numpy", batch_size=req.batch_size,
        fn_constructor_kwargs={"state": [state_ref], "device": "cuda" if req.use_gpu else "cpu",
                               "top_k": req.top_k, "precision": req.precision,
                               "threads": max(1, int(req.cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=req.cpus_per_actor, num_gpus=1 if req.use_gpu else 0)


def _with_error_column(batch: dict) -> dict:
    return {"id": batch["id"], "label": batch["label"], "pixels": batch["pixels"],
            "error": np.full(len(batch["id"]), "", dtype=object)}


def pool_size(req: PredictRequest) -> int:
    """Actors to start: as asked, else one per GPU / half the CPUs (at most 8); refused when they cannot fit."""
    import ray

    from cluster.connect import ClusterError

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), int(total.get("GPU", 0))
    if req.use_gpu and gpus == 0:
        raise ClusterError("--gpu: the cluster has no GPU; drop --gpu to predict on CPUs")
    actors = req.actors or (gpus if req.use_gpu else max(1, min(8, int(cpus // (2 * req.cpus_per_actor)))))
    problems = []
    if actors * req.cpus_per_actor > cpus + 1e-9:
        problems.append(f"--actors {actors} x --cpus-per-actor {req.cpus_per_actor:g} needs {actors * req.cpus_per_actor:g} "
                        f"CPUs but the cluster has {cpus:g}; lower --actors or --cpus-per-actor")
    if req.use_gpu and actors > gpus:
        problems.append(f"--actors {actors}: one GPU each but the cluster has {gpus}; lower --actors")
    if problems:
        raise ClusterError("; ".join(problems))
    return actors


def run_predict(req: PredictRequest) -> dict:
    """Predict every input; write the Parquet file (and confusion PNG); returns the report."""
    import pyarrow.parquet as pq
    import ray
    import torch

    from cluster.connect import connect
    from trainers.config import TrainRunConfig
    from trainers.metrics import confusion_matrix, scores_from_confusion

    state, where, how = load_checkpoint(req.checkpoint)  # all refusals come before Ray starts
    meta = state["meta"]
    classes = [str(c) for c in meta["classes"]]
    shape = tuple(int(s) for s in meta["image_shape"])
    cfg = TrainRunConfig.from_dict(meta["config"])
    inputs = plan_inputs(req.data, meta, cfg.data)
    connect(req.address, dashboard=False)  # as `raysweep train`: nothing here uses Ray's state API
    actors = pool_size(req)
    print(f"raysweep predict: {inputs.count} input(s) from {inputs.describe} ({inputs.labelled} labelled); "
          f"model {cfg.model.name} {'x'.join(map(str, shape))}, {len(classes)} classes, from {how}: {where}; "
          f"{actors} {'GPU' if req.use_gpu else 'CPU'} actor(s)", flush=True)
    for note in inputs.notes:
        print(f"note        {note}", flush=True)

    started = time.time()
    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # rows come back in input order
    try:
        ds = build_dataset(inputs, shape, req, ray.put(state), actors, (meta.get("preprocess") or {}).get("resize"))
    finally:
        ctx.execution_options.preserve_order = saved_order
    schema = output_schema(where, classes)
    cm = torch.zeros(len(classes), len(classes), dtype=torch.long)
    rows = errors = 0
    first_error = ""
    req.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = req.out.with_name(f".{req.out.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                table = _output_table(batch, classes, schema)
                writer.write_table(table)
                rows += table.num_rows
                err = batch["error"].astype(bool)
                if err.any() and not first_error:
                    first_error = str(batch["error"][err][0])
                errors += int(err.sum())
                scored = (batch["label"] >= 0) & ~err
                if scored.any():
                    cm += confusion_matrix(torch.from_numpy(batch["label"][scored]),
                                           torch.from_numpy(batch["pred_index"][scored]), len(classes))
        os.replace(tmp, req.out)
    finally:
        tmp.unlink(missing_ok=True)
    report = {"checkpoint": where, "data": req.data, "inputs": inputs.count, "rows": rows, "errors": errors,
              "scored": int(cm.sum()), "seconds": round(time.time() - started, 2), "out": str(req.out)}
    if rows != inputs.count:  # never expected; refuse to pass it off as complete
        raise RuntimeError(f"predict wrote {rows} rows for {inputs.count} inputs")
    if cm.sum() > 0:
        report.update(scores_from_confusion(cm))
        report["confusion_png"] = str(_side_file(req.out, "confusion.png"))
        Path(report["confusion_png"]).write_bytes(confusion_png(cm.numpy(), classes, title=f"{req.data} ({int(cm.sum())} images)"))
    _side_file(req.out, "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report, first_error), flush=True)
    return report


def _side_file(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}.{suffix}")


def output_schema(checkpoint: str, classes: list[str]):
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("label", pa.int64()), ("label_class", pa.string()),
        ("pred_index", pa.int64()), ("pred_class", pa.string()),
        ("topk_classes", pa.list_(pa.string())), ("topk_probs", pa.list_(pa.float32())),
        ("error", pa.string()),
    ], metadata={"checkpoint": checkpoint, "classes": json.dumps(classes)})


def _output_table(batch: dict, classes: list[str], schema):
    import pyarrow as pa

    err = [str(e) if e else None for e in batch["error"]]
    label = [int(v) if v >= 0 else None for v in batch["label"]]
    pred = [int(p) if e is None else None for p, e in zip(batch["pred_index"], err)]
    topk_c = [[classes[j] for j in row] if e is None else None for row, e in zip(batch["topk_index"], err)]
    topk_p = [[float(p) for p in row] if e is None else None for row, e in zip(batch["topk_probs"], err)]
    return pa.table({
        "id": [str(i) for i in batch["id"]],
        "label": label,
        "label_class": [classes[v] if v is not None else None for v in label],
        "pred_index": pred,
        "pred_class": [classes[p] if p is not None else None for p in pred],
        "topk_classes": topk_c, "topk_probs": topk_p, "error": err,
    }, schema=schema)


def confusion_png(cm: np.ndarray, classes: list[str], title: str = "") -> bytes:
    """cm[true, predicted] as a PNG heat map with counts."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(16, 2 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    if k <= 30:
        hi = cm.max() / 2 if cm.size else 0
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    ax.text(p, t, int(cm[t, p]), ha="center", va="center", fontsize=8,
                            color="white" if cm[t, p] > hi else "black")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def format_report(r: dict, first_error: str) -> str:
    lines = []
    if "accuracy" in r:
        lines.append("metrics     " + "  ".join(f"{k} {r[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1"))
                     + f"  (macro, {r['scored']} labelled images)")
    if r["errors"]:
        lines.append(f"errors      {r['errors']} of {r['inputs']} input(s) not predicted (see the error column), "
                     f"e.g. {first_error[:300]}")
    lines.append(f"wrote       {r['out']} ({r['rows']} rows for {r['inputs']} inputs, {r['seconds']:.1f} s)"
                 + (f", {r['confusion_png']}" if "confusion_png" in r else ""))
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------


def _checkpoint_argument(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH|EXPERIMENT",
                   help="a checkpoint dir or state.pt, a train run dir (summary.json) or a tune experiment dir (best.json)")


def _predict_arguments(p) -> None:
    _checkpoint_argument(p)
    p.add_argument("--data", required=True, metavar="NAME[:PATH]",
                   help="imagefolder:DIR, parquet:FILE|DIR, or a data set name (digits, ...) for its test split")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.parquet", help="where the predictions go")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="one GPU per model actor; refused where there is none")
    p.add_argument("--actors", type=int, help="model actors in the pool (default: one per GPU, else half the CPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision (default: the checkpoint's train.precision, as its test evaluation used)")
    add_common(p, storage=False)


def _refuse(name: str, e: Exception) -> int:
    print(f"raysweep {name}: {e}", file=sys.stderr)
    return EXIT_BAD_REQUEST


@command("predict", "batch inference of a checkpoint on Ray Data: one Parquet row per input")(_predict_arguments)
def _predict(args) -> int:
    req = PredictRequest(args.checkpoint, args.data, args.out, args.batch_size, args.top_k, args.gpu,
                         args.actors, args.cpus_per_actor, args.precision, args.address)
    if problems := req.problems():
        return _refuse("predict", "; ".join(problems))
    try:
        report = run_predict(req)
    except (CheckpointError, InferenceError) as e:
        return _refuse("predict", e)
    return EXIT_OK if report["rows"] > report["errors"] else EXIT_FAILED


def _export_arguments(p) -> None:
    _checkpoint_argument(p)
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write, e.g. model.pt")
    p.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="torchscript")


@command("export", "write a checkpoint as one file plain PyTorch loads (network + preprocessing + classes)")(_export_arguments)
def _export(args) -> int:
    try:
        state, where, how = load_checkpoint(args.checkpoint)
    except (CheckpointError, InferenceError) as e:
        return _refuse("export", e)
    meta = state["meta"]
    path = EXPORT_FORMATS[args.format](state, args.out)
    shape = ", ".join(map(str, meta["image_shape"]))
    print(f"raysweep export: {how}: {where}\n"
          f"wrote       {path} ({args.format}, {path.stat().st_size / 1e6:.1f} MB): uint8 (N, {shape}) -> "
          f"probabilities over {len(meta['classes'])} classes; classes in m.classes and extra file classes.json\n"
          f"load with   m = torch.jit.load({str(path)!r}); probs = m(images_uint8)", flush=True)
    return EXIT_OK
