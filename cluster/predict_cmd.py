"""`raysweep predict` (batch inference on Ray Data) and `raysweep export` (one TorchScript file).

predict: inputs (``predict_inputs``) -> Ray Data: the readers and decoder training uses
(``trainers.streaming``), with the checkpoint's own preprocessing -> a pool of model actors
(CPU or GPU) -> rows streamed back to the driver and written to one Parquet file
(``predict_report``). Every input gives exactly one row; one that cannot be read or
decoded, or that does not fit the model, gets its reason in ``error`` instead of a
prediction. Where labels exist the driver also prints accuracy and macro
precision/recall/F1 and draws the confusion matrix next to the output.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.cli import EXIT_BAD_REQUEST, EXIT_FAILED, EXIT_OK, add_common, command, positive_float
from cluster.predict_inputs import UNKNOWN_CLASSES, Inputs, load_checkpoint, plan_inputs
from cluster.predict_report import (PredictError, confusion_png, format_report, output_schema, side_file,
                                    write_predictions)
from trainers.checkpoints import CheckpointError
from trainers.configtools import ConfigError, out_file_problem
from trainers.distributed import times_fitting as how_many  # actors that fit: one rule with tune's trials
from trainers.inference import (EXPORT_FORMATS, InferenceError, classifier_from_state, inference_precision,
                                predict, tta_level)
from trainers.predict_readers import NO_LABEL, conform_rows, decode_rows, evaluation_spec, read_files, read_row_groups
from trainers.streaming import DecodeSpec
from trainers.tta import TTA

__all__ = ["PredictRequest", "load_checkpoint", "run_predict", "how_many"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class Predictor:
    """One model replica in Ray Data's actor pool: work items -> ``stages`` (the readers and
    decoder of ``trainers.streaming``) -> uint8 images -> prediction and top-k, at most
    ``batch_size`` images at a time through the model."""

    def __init__(self, state, stages, device: str, top_k: int, precision: str | None, threads: int, batch_size: int,
                 tta: str | None = None):
        import ray

        state = ray.get(state[0])  # the weights, put once by the driver
        self._load(state, stages, device, top_k, precision, threads, batch_size, tta)

    @classmethod
    def from_state(cls, state: dict, stages, device: str, top_k: int, precision: str | None, threads: int,
                   batch_size: int, tta: str | None = None) -> "Predictor":
        """The same predictor from the weights themselves (a Serve replica's, which holds them)."""
        self = cls.__new__(cls)
        self._load(state, stages, device, top_k, precision, threads, batch_size, tta)
        return self

    def _load(self, state: dict, stages, device, top_k, precision, threads, batch_size, tta) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.clf, cfg = classifier_from_state(state, device)
        self.precision = inference_precision(cfg, device, precision)
        self.tta = tta_level(cfg, tta)
        self.k = min(top_k, len(self.clf.classes))
        self.stages, self.batch_size = stages, batch_size

    def __call__(self, batch: dict) -> dict:
        import torch

        for fn, kwargs in self.stages:
            batch = fn(batch, **kwargs)
        n = len(batch["id"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        pred = np.full(n, NO_LABEL, dtype=np.int64)
        top_idx = np.full((n, self.k), NO_LABEL, dtype=np.int64)
        top_p = np.full((n, self.k), np.nan, dtype=np.float32)
        for chunk in np.array_split(np.flatnonzero(ok), max(1, math.ceil(ok.sum() / self.batch_size))):
            if len(chunk):
                x = torch.from_numpy(np.ascontiguousarray(batch["image"][chunk]))
                p, i, v = predict(self.clf, x, self.k, self.precision, self.tta)
                pred[chunk], top_idx[chunk], top_p[chunk] = p.cpu().numpy(), i.cpu().numpy(), v.cpu().numpy()
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
    unknown_classes: str = "unlabelled"
    tta: str | None = None  # None: the checkpoint's train.tta

    def problems(self) -> list[str]:
        out = []
        if self.batch_size < 1:
            out.append(f"--batch-size: {self.batch_size} must be >= 1")
        if self.top_k < 1:
            out.append(f"--top-k: {self.top_k} must be >= 1")
        if self.actors is not None and self.actors < 1:
            out.append(f"--actors: {self.actors} must be >= 1")
        if not self.cpus_per_actor > 0 or math.isinf(self.cpus_per_actor):
            out.append(f"--cpus-per-actor: {self.cpus_per_actor} must be a number > 0")
        if self.unknown_classes not in UNKNOWN_CLASSES:
            out.append(f"--unknown-classes: {self.unknown_classes!r} is not one of {', '.join(UNKNOWN_CLASSES)}")
        if self.tta is not None and self.tta not in TTA:
            out.append(f"--tta: {self.tta!r} is not one of {', '.join(TTA.names())}")
        if problem := out_file_problem(self.out):
            out.append(problem + (" such as predictions.parquet" if problem.endswith("give a file name in it") else ""))
        return out


def stages(inputs: Inputs, spec: DecodeSpec) -> list[tuple]:
    """What turns ``inputs``' work items into images, as (function, keyword arguments)."""
    fit = (conform_rows if inputs.kind == "memory" else decode_rows, {"spec": spec})
    read = {"files": [(read_files, {})], "parquet": [(read_row_groups, {"label_maps": inputs.label_maps})]}
    return read.get(inputs.kind, []) + [fit]


@contextlib.contextmanager
def _remote_args_deprecation_filtered():
    """Ray 2.60 deprecates map_batches' keyword remote args (removal in 2.64) but names no
    replacement for max_restarts: its named parameters, ActorPoolStrategy and DataContext have
    none, and ray_remote_args_fn is deprecated too. A user cannot act on it, so only that
    message is filtered, only here (docs/development.md); revisit before allowing Ray 2.64."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        yield


@_remote_args_deprecation_filtered()
def build_dataset(inputs: Inputs, spec: DecodeSpec, req: PredictRequest, state_ref, actors: int):
    """Work items -> the model actors, which read, decode and predict them: one operator, so
    no decode task waits for a CPU that the actors hold, and rows stay in input order."""
    import ray.data

    per_call = 1 if inputs.kind == "parquet" else req.batch_size  # a Parquet item is a whole row group
    blocks = max(1, min(200, math.ceil(len(inputs.items) / per_call)))
    ds = ray.data.from_items(inputs.items, override_num_blocks=blocks)
    return ds.map_batches(
        Predictor, batch_format="numpy", batch_size=per_call,
        fn_constructor_kwargs={"state": [state_ref], "stages": stages(inputs, spec),
                               "device": "cuda" if req.use_gpu else "cpu", "top_k": req.top_k,
                               "precision": req.precision, "threads": max(1, int(req.cpus_per_actor)),
                               "batch_size": req.batch_size, "tta": req.tta},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=req.cpus_per_actor, num_gpus=1 if req.use_gpu else 0,
        # Ray Data hands every actor its code through the object store; with restarts on
        # (its default) Ray logs an error line about that on every predict. A predictor
        # actor that dies fails the predict instead, which leaves no output: run it again.
        # (Ray 2.60 deprecates this keyword form with no named one: see the filter above.)
        max_restarts=0)


def default_actors(cpus: float, gpus: int, req: PredictRequest) -> int:
    """As asked, else one per GPU, else half the CPUs (at most 8)."""
    return req.actors or (gpus if req.use_gpu else max(1, min(8, how_many(cpus, 2 * req.cpus_per_actor))))


def pool_size(req: PredictRequest) -> int:
    """Actors to start (``default_actors``); refused when they cannot fit."""
    import ray

    from cluster.connect import ClusterError

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), int(total.get("GPU", 0))
    if req.use_gpu and gpus == 0:
        raise ClusterError("--gpu: the cluster has no GPU; drop --gpu to predict on CPUs")
    actors = default_actors(cpus, gpus, req)
    problems = []
    if actors > how_many(cpus, req.cpus_per_actor):
        problems.append(f"--actors {actors} x --cpus-per-actor {req.cpus_per_actor:g} needs {actors * req.cpus_per_actor:g} "
                        f"CPUs but the cluster has {cpus:g}; lower --actors or --cpus-per-actor")
    if req.use_gpu and actors > gpus:
        problems.append(f"--actors {actors}: one GPU each but the cluster has {gpus}; lower --actors")
    if problems:
        raise ClusterError("; ".join(problems))
    return actors


def run_predict(req: PredictRequest) -> dict:
    """Predict every input; write the Parquet file (and confusion PNG); returns the report."""
    import ray
    import torch

    from cluster.connect import connect
    from trainers.config import TrainRunConfig
    from trainers.metrics import scores_from_confusion

    state, where, how = load_checkpoint(req.checkpoint)  # all refusals come before Ray starts
    meta = state["meta"]
    classes = [str(c) for c in meta["classes"]]
    spec = evaluation_spec(meta["image_shape"], (meta.get("preprocess") or {}).get("resize"))
    cfg = TrainRunConfig.from_dict(meta["config"])
    inputs = plan_inputs(req.data, meta, cfg.data, req.unknown_classes)
    connect(req.address, dashboard=False)  # as `raysweep train`: nothing here uses Ray's state API
    actors = pool_size(req)
    resized = f", inputs resized to {spec.size[0]}x{spec.size[1]}" if spec.size else ""
    print(f"raysweep predict: {inputs.count} input(s) from {inputs.describe} ({inputs.labelled} labelled); "
          f"model {cfg.model.name} {'x'.join(map(str, spec.shape))}{resized}, {len(classes)} classes, "
          f"test-time augmentation {tta_level(cfg, req.tta)}, from {how}: "
          f"{where}; {actors} {'GPU' if req.use_gpu else 'CPU'} actor(s)", flush=True)
    for note in inputs.notes:
        print(f"note        {note}", flush=True)

    started = time.time()
    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # rows come back in input order
    try:
        ds = build_dataset(inputs, spec, req, ray.put(state), actors)
    finally:
        ctx.execution_options.preserve_order = saved_order
    tally = write_predictions(ds.iter_batches(batch_size=None, batch_format="numpy"), req.out,
                              output_schema(where, classes), classes, inputs.count)
    report = {"checkpoint": where, "data": req.data, "inputs": inputs.count, "rows": tally.rows,
              "errors": tally.errors, "labelled": tally.labelled, "scored": tally.scored,
              "seconds": round(time.time() - started, 2), "out": str(req.out)}
    if tally.scored > 0:
        report.update(scores_from_confusion(torch.from_numpy(tally.cm)))
        report["confusion_png"] = str(side_file(req.out, "confusion.png"))
        Path(report["confusion_png"]).write_bytes(confusion_png(tally.cm, classes, title=f"{req.data} ({tally.scored} images)"))
    side_file(req.out, "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report, tally.first_error), flush=True)
    return report


# -- CLI --------------------------------------------------------------------------------


def _checkpoint_argument(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH|EXPERIMENT",
                   help="a checkpoint dir or state.pt, a train run dir (summary.json) or a tune experiment dir (best.json)")
    p.add_argument("--trial", metavar="ID", help="with a tune experiment as --checkpoint: this trial's checkpoint "
                   "instead of the best one (e.g. any trial on a Pareto front; `raysweep results` lists them)")


def _checkpoint_of(args) -> str:
    from cluster.tune_results import trial_checkpoint

    return args.checkpoint if args.trial is None else trial_checkpoint(args.checkpoint, args.trial)


def _tta_argument(p) -> None:
    p.add_argument("--tta", choices=TTA.names(), metavar="LEVEL",
                   help=f"test-time augmentation: {', '.join(TTA.names())} (default: the checkpoint's train.tta, "
                        "as its test evaluation used)")


def _predict_arguments(p) -> None:
    _checkpoint_argument(p)
    p.add_argument("--data", required=True, metavar="NAME[:PATH]",
                   help="imagefolder:DIR, parquet:FILE|DIR, or a data set name (digits, ...) for its test split")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.parquet", help="where the predictions go")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="one GPU per model actor; refused where there is none")
    p.add_argument("--actors", type=int, help="model actors in the pool (default: one per GPU, else half the CPUs)")
    p.add_argument("--cpus-per-actor", type=positive_float, default=1.0)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision (default: the checkpoint's train.precision, as its test evaluation used)")
    p.add_argument("--unknown-classes", choices=UNKNOWN_CLASSES, default=UNKNOWN_CLASSES[0],
                   help="inputs labelled with a class the model does not know (a stray class folder): predict them "
                        "without a label (unlabelled, the default), leave them out (skip), or refuse the request (error)")
    _tta_argument(p)
    add_common(p, storage=False)


def _refuse(name: str, e: Exception, code: int = EXIT_BAD_REQUEST) -> int:
    print(f"raysweep {name}: {e}", file=sys.stderr)
    return code


@command("predict", "batch inference of a checkpoint on Ray Data: one Parquet row per input")(_predict_arguments)
def _predict(args) -> int:
    req = PredictRequest(_checkpoint_of(args), args.data, args.out, args.batch_size, args.top_k, args.gpu,
                         args.actors, args.cpus_per_actor, args.precision, args.address, args.unknown_classes,
                         args.tta)
    if problems := req.problems():
        return _refuse("predict", "; ".join(problems))
    try:
        report = run_predict(req)
    except (CheckpointError, InferenceError) as e:
        return _refuse("predict", e)
    except PredictError as e:
        return _refuse("predict", e, EXIT_FAILED)
    return EXIT_OK if report["rows"] > report["errors"] else EXIT_FAILED


def _export_arguments(p) -> None:
    _checkpoint_argument(p)
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write, e.g. model.pt")
    p.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="torchscript")
    _tta_argument(p)


@command("export", "write a checkpoint as one file plain PyTorch loads (network + preprocessing + classes)")(_export_arguments)
def _export(args) -> int:
    if problem := out_file_problem(args.out):
        raise ConfigError([problem])
    try:
        state, where, how = load_checkpoint(_checkpoint_of(args))
    except (CheckpointError, InferenceError) as e:
        return _refuse("export", e)
    meta = state["meta"]
    path = EXPORT_FORMATS[args.format](state, args.out, args.tta)
    shape = ", ".join(map(str, meta["image_shape"]))
    level = args.tta or (meta["config"].get("train") or {}).get("tta", "none")
    print(f"raysweep export: {how}: {where}\n"
          f"wrote       {path} ({args.format}, {path.stat().st_size / 1e6:.1f} MB): uint8 (N, {shape}) -> "
          f"probabilities over {len(meta['classes'])} classes (test-time augmentation {level}); classes in m.classes "
          f"and extra file classes.json\n"
          f"load with   m = torch.jit.load({str(path)!r}); probs = m(images_uint8)", flush=True)
    return EXIT_OK
