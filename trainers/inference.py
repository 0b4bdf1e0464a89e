"""Inference on raw images with a checkpoint's network and its own preprocessing.

Plain functions, no Ray: ``cluster/predict_cmd.py`` runs them in Ray Data actors, tests run
them directly. A ``Classifier`` takes what training took, uint8 ``(N, C, H, W)`` at the
training image size, normalises it with the checkpoint's mean and std exactly as training
did (``trainers.loop.Normalizer``) and returns logits or probabilities.

``export_torchscript`` writes one file that plain PyTorch loads (``torch.jit.load``) with
no raysweep installed: the network, the normalisation and the class names.

>>> import torch
>>> from trainers.inference import topk
>>> idx, probs = topk(torch.tensor([[0.0, 2.0, 1.0]]), 2)
>>> idx.tolist(), [round(p, 3) for p in probs[0].tolist()]
([[1, 2]], [0.665, 0.245])
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from trainers.checkpoints import network_from_state
from trainers.config import TrainRunConfig
from trainers.configtools import shown
from trainers.loop import Normalizer, autocast_for, resolve_precision
from trainers.preprocess import RESIZE_RATIO
from trainers.tta import TTA, TTANet


class InferenceError(ValueError):
    """The checkpoint or input cannot be used for inference; the message says why."""


REQUIRED_META = ("config", "classes", "mean", "std", "image_shape")


class Classifier(nn.Module):
    """uint8 ``(N, C, H, W)`` at ``image_shape`` -> logits ``(N, K)`` (``forward``) or
    probabilities (``probabilities``); ``classes[k]`` names column ``k``."""

    def __init__(self, net: nn.Module, mean, std, classes, image_shape):
        super().__init__()
        self.net = net
        self.normalize = Normalizer(mean, std)
        self.classes = [str(c) for c in classes]
        self.image_shape = tuple(int(s) for s in image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x).float(), dim=1)


def check_state(state) -> dict:
    """The checkpoint's ``meta``, or ``InferenceError`` naming what is missing."""
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("meta"), dict):
        raise InferenceError("not a raysweep checkpoint: it needs the keys 'model' and 'meta' "
                             "(point --checkpoint at a checkpoint_*/ directory of a raysweep run)")
    missing = [k for k in REQUIRED_META if k not in state["meta"]]
    if missing:
        raise InferenceError(f"checkpoint meta lacks {missing}; it was not written by raysweep train")
    problems = ([] if isinstance(state["model"], dict) else [f"model {shown(state['model'])} is not a state dict"])
    if problems := problems + meta_problems(state["meta"]):
        raise InferenceError(f"checkpoint {'; '.join(problems)}; it was not written by raysweep train, or was changed")
    return state["meta"]


def meta_problems(meta: dict) -> list[str]:
    """What in a checkpoint's ``meta`` cannot be what raysweep train writes (each reader would
    trip on it later, in a Ray actor or inside torch)."""
    out = []
    shape = meta.get("image_shape")
    whole = isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_whole(v) for v in shape)
    if not (whole and 1 <= shape[0] <= 4 and all(1 <= v <= 4096 for v in shape[1:])):
        out.append(f"meta.image_shape {shown(shape)} is not [channels 1-4, height 1-4096, width 1-4096]")
    classes = meta.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        out.append(f"meta.classes {shown(classes)} is not a list of class names")
    for key in ("mean", "std"):
        v = meta.get(key)
        if not (isinstance(v, (list, tuple)) and all(_finite(x) for x in v) and (not whole or len(v) == shape[0])):
            out.append(f"meta.{key} {shown(v)} is not one finite number per channel")
    if not isinstance(meta.get("config"), dict):
        out.append(f"meta.config {shown(meta.get('config'))} is not a mapping")
    pre = meta.get("preprocess")
    resize = pre.get("resize") if isinstance(pre, dict) else None
    if not (pre is None or isinstance(pre, dict)) or not (
            resize is None or (isinstance(resize, (list, tuple)) and len(resize) == 2 and all(map(_whole, resize)))):
        out.append(f"meta.preprocess {shown(pre)} is not a mapping with resize [H, W] or none")
    return out


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def classifier_from_state(state: dict, device: torch.device | str = "cpu") -> tuple[Classifier, TrainRunConfig]:
    """Rebuild the trained network (eval mode) with its preprocessing; returns (classifier, config)."""
    check_state(state)
    net, cfg, meta = network_from_state(state)
    clf = Classifier(net, meta["mean"], meta["std"], meta["classes"], meta["image_shape"])
    return clf.to(device).eval(), cfg


def inference_precision(cfg: TrainRunConfig, device: torch.device | str, requested: str | None = None) -> str:
    """The precision test evaluation used for this checkpoint on ``device`` (or ``requested``)."""
    return resolve_precision(requested or cfg.train.precision, torch.device(device))


def tta_level(cfg: TrainRunConfig, requested: str | None = None) -> str:
    """The test-time augmentation for this checkpoint: ``requested``, else its ``train.tta``
    (what its test evaluation used); ``InferenceError`` for an unknown level."""
    level = requested or cfg.train.tta
    if level not in TTA:
        raise InferenceError(f"--tta: {level!r} is not a known test-time augmentation; "
                             f"choose one of: {', '.join(TTA.names())}")
    return level


def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable classes per row: (indices int64 ``(N, k)``, probabilities float32 ``(N, k)``)."""
    probs = torch.softmax(logits.float(), dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return indices, values


@torch.no_grad()
def predict(clf: Classifier, x: torch.Tensor, k: int, precision: str = "fp32", tta: str = "none"):
    """uint8 ``(N, C, H, W)`` -> (predicted index ``(N,)``, top-k indices, top-k probabilities).

    The prediction is the argmax of the logits, as ``trainers.loop.evaluate`` scores it, and
    under the same autocast precision and test-time augmentation (``trainers.tta``), so
    accuracy here equals the run's test accuracy.
    """
    device = next(clf.parameters()).device
    x = x.to(device)
    with autocast_for(precision, device):
        logits = TTA[tta](clf.net, clf.normalize(x))
    logits = logits.float()
    indices, values = topk(logits, k)
    return logits.argmax(1), indices, values


def shape_problem(image: torch.Tensor, expected: tuple[int, ...]) -> str | None:
    """None when ``image`` (C, H, W) fits the model; otherwise what is wrong and the fix."""
    if tuple(image.shape) == tuple(expected):
        return None
    return (f"image is {'x'.join(map(str, image.shape))} (CxHxW) but the model takes "
            f"{'x'.join(map(str, expected))}; resize / convert it to the training size and channels")


# -- export ---------------------------------------------------------------------------


class _Exported(nn.Module):
    """What ``torch.jit.load`` returns: uint8 ``(N, C, H, W)`` -> probabilities ``(N, K)``."""

    def __init__(self, net, mean, std, classes, image_shape, resize: list[int] | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255))
        self.classes = list(classes)
        self.image_shape = list(image_shape)
        # The run's data.image_size (0, 0: none): then any size goes in, resized as evaluation did.
        self.resize_h, self.resize_w = (int(resize[0]), int(resize[1])) if resize else (0, 0)
        self.resize_ratio = RESIZE_RATIO

    def _resized(self, x: torch.Tensor) -> torch.Tensor:
        """``preprocess.resize`` in TorchScript: scale to cover size / 0.875, centre crop."""
        th, tw = self.resize_h, self.resize_w
        h, w = x.size(2), x.size(3)
        scale = max(th / self.resize_ratio / h, tw / self.resize_ratio / w)
        nh, nw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
        z = torch.nn.functional.interpolate(x.float(), size=[nh, nw], mode="bilinear", align_corners=False,
                                            antialias=True)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        return z[:, :, top:top + th, left:left + tw].round().clamp(0, 255).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise ValueError("expected a uint8 image batch (N, C, H, W) with values 0-255")
        if self.resize_h > 0 and x.dim() == 4:
            x = self._resized(x)
        if x.dim() != 4 or x.size(1) != self.image_shape[0] or x.size(2) != self.image_shape[1] \
                or x.size(3) != self.image_shape[2]:
            raise ValueError("expected images of shape (N, C, H, W) = (N, " + str(self.image_shape[0]) + ", "
                             + str(self.image_shape[1]) + ", " + str(self.image_shape[2]) + ")")
        z = (x.float() - self.mean) * self.inv_std
        return torch.softmax(self.net(z).float(), dim=1)


def export_torchscript(state: dict, path: str | Path, tta: str | None = None) -> Path:
    """Write the checkpoint as one TorchScript file (fp32, CPU): network + normalisation +
    class names (attribute ``classes`` and extra file ``classes.json``; ``meta.json`` holds
    image shape, mean, std, ``tta`` and the training config). ``tta`` (default the checkpoint's
    ``train.tta``) is traced into the file: its probabilities are the softmax of the averaged
    logits, as ``predict`` gives with the same level."""
    clf, cfg = classifier_from_state(state, "cpu")
    level = tta_level(cfg, tta)
    clf.requires_grad_(False)  # an inference file: outputs carry no autograd graph
    meta = state["meta"]
    shape = tuple(int(s) for s in meta["image_shape"])
    example = torch.zeros((2, *shape))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated, still loads it
        traced = torch.jit.trace(TTANet(clf.net, level), example, check_trace=False)
        # Scripted (not traced) on top so the input checks and the class names survive.
        resize = (meta.get("preprocess") or {}).get("resize")
        module = torch.jit.script(_Exported(traced, meta["mean"], meta["std"], clf.classes, shape, resize).eval())
    extra = {
        "classes.json": json.dumps(clf.classes),
        "meta.json": json.dumps({"image_shape": list(shape), "mean": list(meta["mean"]), "std": list(meta["std"]),
                                 "preprocess": meta.get("preprocess"),
                                 "input": "uint8 (N, C, H, W)" + (", any H and W: resized inside" if resize else ""),
                                 "output": "probabilities (N, K)", "tta": level,
                                 "config": meta["config"]}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(path), _extra_files=extra)
    return path


EXPORT_FORMATS = {"torchscript": export_torchscript}
