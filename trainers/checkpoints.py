"""Checkpoints: one ``state.pt`` of tensors and plain values, loaded with ``weights_only``.

A checkpoint holds the model weights, optimizer and scheduler state, the epoch, the
early-stopping state and ``meta`` (config, class names, normalisation, image shape), so a
model can be rebuilt and fed raw images without the run that made it.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import torch

from trainers.config import TrainRunConfig
from trainers.configtools import FILE_ERRORS, ConfigError, clean_error, file_problem
from trainers.data import Split
from trainers.loop import Model, Normalizer, evaluate, reduce_validation, resolve_precision, split_batches
from trainers.models import build_model
from trainers.streaming import torch_batches
from trainers.tta import TTANet

STATE_FILE = "state.pt"


class CheckpointError(ValueError):
    pass


def save_state(state: dict, directory: str | Path) -> Path:
    """Write ``state.pt`` into ``directory`` (made if missing). Written under another name
    and renamed, so a process that dies while writing leaves no half file by that name."""
    path = Path(directory) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)
    return path


def load_state(path: str | Path) -> dict:
    """Load a checkpoint directory or ``state.pt`` file as weights only (no arbitrary unpickling)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no raysweep checkpoint at {str(path)!r} (expected a directory with {STATE_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load; it needs arbitrary unpickling, which could run code ({clean_error(str(e))[:300]})"
        ) from None
    except FILE_ERRORS as e:  # empty (EOFError), cut short (RuntimeError from the zip reader), unreadable
        raise CheckpointError(f"{file_problem(path, e)} (is it a raysweep {STATE_FILE}? a copy may have been "
                              "cut short; re-copy it or use another checkpoint)") from None
    if not isinstance(state, dict) or not {"model", "meta"} <= set(state):
        raise CheckpointError(f"{path}: not a raysweep checkpoint (expected a dict with 'model' and 'meta', "
                              f"got {type(state).__name__}); give a checkpoint_*/ directory that raysweep saved")
    return state


def network_from_state(state: dict) -> tuple[torch.nn.Module, TrainRunConfig, dict]:
    """The trained network, its weights loaded (train mode, on CPU); returns (net, config, meta)."""
    meta = state["meta"]
    try:
        cfg = TrainRunConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint's meta.config is not a valid run config: {'; '.join(e.problems)}") \
            from None
    channels, height, _ = meta["image_shape"]
    # Not from model.pretrained again: the checkpoint holds every weight, and that file may be gone.
    net = build_model(dataclasses.replace(cfg.model, pretrained=None), channels, height, len(meta["classes"]))
    try:
        net.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:  # keys or shapes that do not fit
        reason = clean_error(str(e)).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"the checkpoint's weights do not fit the {cfg.model.name} its meta describes "
                              f"({len(meta['classes'])} classes, image {list(meta['image_shape'])}): {reason}") \
            from None
    return net, cfg, meta


def model_from_state(state: dict, device: torch.device | str = "cpu") -> tuple[Model, TrainRunConfig, dict]:
    """Rebuild the trained network (eval mode) with its normaliser; returns (model, config, meta)."""
    net, cfg, meta = network_from_state(state)
    model = Model(net.to(device).eval(), Normalizer(meta["mean"], meta["std"]).to(device), torch.contiguous_format)
    return model, cfg, meta


def evaluate_state(state: dict, split, device: torch.device | str = "cpu", prefix: str = "test",
                   confusion: bool = False, tta: str | None = None) -> dict:
    """Accuracy and macro precision/recall/F1 of a checkpoint (one process) on ``split``:
    an in-memory ``Split``, or a Ray Dataset of a streamed set. With ``confusion``, also
    ``<prefix>_confusion_matrix`` (``[true][predicted]`` counts, plain lists for JSON) and
    ``<prefix>_classes`` (the class names, in the matrix's order). ``tta``: the test-time
    augmentation (``trainers.tta``; default the checkpoint's ``train.tta``); the loss is that
    of the averaged logits."""
    device = torch.device(device)
    model, cfg, meta = model_from_state(state, device)
    model = dataclasses.replace(model, net=TTANet(model.net, tta or cfg.train.tta))
    if isinstance(split, Split):
        batches = split_batches(Split(split.x.to(device), split.y.to(device)))
    else:
        batches = torch_batches(split, 1024, device)
    precision = resolve_precision(cfg.train.precision, device)
    loss_sum, cm = evaluate(model, batches, cfg, len(meta["classes"]), precision, device)
    scores = reduce_validation(loss_sum, cm, prefix)
    if confusion:
        scores |= {f"{prefix}_confusion_matrix": cm.cpu().tolist(), f"{prefix}_classes": list(meta["classes"])}
    return scores
