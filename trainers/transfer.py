"""Transfer learning: where ``model.pretrained`` weights come from, how they enter a
network, and what ``freeze_backbone`` fixes.

``model.pretrained`` is one of
- ``imagenet``: torchvision's ResNet-50 file already in the torch hub cache (resnet50 only;
  raysweep never downloads);
- a raysweep checkpoint of any ``train`` or ``tune`` run, local or a pyarrow.fs URI: a
  ``checkpoint_*/`` directory, its ``state.pt``, a train run's directory (its
  ``summary.json`` names the best checkpoint) or a search's (``best.json``);
- a plain ``.pth`` state dict: torchvision's ResNet-50 layout for resnet50, else the
  model's own (``torch.save(net.state_dict(), path)``).

Everything is loaded weights-only (``torch.load(weights_only=True)``): no file can run code.
The backbone (every weight outside the model's head) must match the network exactly; the
head is taken too when its shapes match (same class count), else it stays newly
initialised. ``freeze_backbone`` stops gradients to the backbone and swaps its BatchNorm
layers for torchvision's ``FrozenBatchNorm2d``, so its running statistics stay fixed too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainers.configtools import json_record, record_text, user_path

STATE_FILE = "state.pt"  # trainers.checkpoints.STATE_FILE (not imported: it imports the models)
RUN_RECORDS = (("summary.json", "a train run's best checkpoint"), ("best.json", "a search's best trial"))


class ModelError(ValueError):
    """The model cannot be built as configured; the message names the field and the fix."""


@dataclass(frozen=True)
class Pretrained:
    """Weights read from ``model.pretrained``: a state dict, the model whose checkpoint it
    was (None for a plain file) and the file it came from."""

    weights: dict
    model_name: str | None
    where: str


def absolute_location(spec: str) -> str:
    """A relative local ``model.pretrained`` made absolute, on the driver: Ray Train starts
    its workers in a directory of its own, where a relative path would name nothing."""
    if spec == "imagenet" or "://" in spec:
        return spec
    return str(user_path(spec, "model.pretrained").absolute())


def imagenet_weights() -> Path:
    """torchvision's ResNet-50 file in the torch hub cache, where
    ``torchvision.models.resnet50(weights='DEFAULT')`` leaves it."""
    from torchvision.models import ResNet50_Weights

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in ResNet50_Weights:
        path = cache / Path(weights.url).name
        if path.is_file():
            return path
    raise ModelError(
        f"model.pretrained: 'imagenet' weights are not in the torch cache ({cache}); raysweep never "
        "downloads them: fetch once with torchvision.models.resnet50(weights='DEFAULT') or give a .pth path")


def _read(spec: str) -> tuple[bytes, str]:
    """The bytes of the weights file ``spec`` names (local or URI), and where it was."""
    import pyarrow.fs as pafs

    from trainers.uris import file_info, open_location

    fs, path = open_location(spec, "model.pretrained")
    info = file_info(fs, path, spec, "model.pretrained")
    if info.type == pafs.FileType.Directory:
        path = _checkpoint_in(fs, path, spec)
    elif info.type != pafs.FileType.File:
        raise ModelError(f"model.pretrained: no file or directory at {spec!r}; give a raysweep checkpoint "
                         "(run or checkpoint_*/ directory, state.pt), a .pth file or 'imagenet'")
    try:
        with fs.open_input_stream(path) as f:
            return f.read(), path
    except OSError as e:
        raise ModelError(f"model.pretrained {spec!r}: cannot read {path} ({str(e)[:200]})") from None


def _checkpoint_in(fs, path: str, spec: str) -> str:
    """``state.pt`` of a checkpoint directory, or of the best checkpoint a run records."""
    import pyarrow.fs as pafs

    if fs.get_file_info(f"{path}/{STATE_FILE}").type == pafs.FileType.File:
        return f"{path}/{STATE_FILE}"
    for record, what in RUN_RECORDS:
        if fs.get_file_info(f"{path}/{record}").type != pafs.FileType.File:
            continue
        with fs.open_input_stream(f"{path}/{record}") as f:
            checkpoint = record_text(json_record(f.read(), f"{spec}: {record}"), "checkpoint", f"{spec}: {record}")
        if not checkpoint:
            raise ModelError(f"model.pretrained {spec!r}: {record} names no checkpoint ({what}); "
                             "point at a checkpoint_*/ directory instead")
        checkpoint = checkpoint.split("://", 1)[-1] if "://" in checkpoint else checkpoint
        if not checkpoint.startswith("/") and "://" not in spec:
            checkpoint = f"{path}/{checkpoint}"
        return _checkpoint_in(fs, checkpoint.rstrip("/"), spec) if not checkpoint.endswith(STATE_FILE) else checkpoint
    raise ModelError(f"model.pretrained {spec!r}: a directory without {STATE_FILE}, summary.json or best.json; "
                     "give a raysweep run or checkpoint_*/ directory")


def read_pretrained(spec: str) -> Pretrained:
    """The weights ``model.pretrained`` names, loaded weights-only (see the module's docstring)."""
    if spec == "imagenet":
        raw, where = imagenet_weights().read_bytes(), "imagenet"
    else:
        raw, where = _read(spec)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean "unusable"
        raise ModelError(f"model.pretrained {spec!r}: {where} is not a weights-only torch file "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and isinstance(state.get("meta"), dict):
        name = ((state["meta"].get("config") or {}).get("model") or {}).get("name")
        return Pretrained(state["model"], name, where)
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return Pretrained(state, None, where)
    raise ModelError(f"model.pretrained {spec!r}: {where} holds neither a raysweep checkpoint nor a state dict")


def load_backbone(net: nn.Module, pretrained: Pretrained, model_name: str, head: str, prefix: str = "") -> bool:
    """Copy ``pretrained``'s weights into ``net``: every key outside ``head`` (a key prefix)
    must be there with the same shape; the head is copied only when all of its shapes match.
    ``prefix`` is prepended to the file's keys (torchvision's ResNet-50 sits under ``1.``).
    Returns True when the head was copied too, False when it was left new."""
    if pretrained.model_name not in (None, model_name):
        raise ModelError(f"model.pretrained: {pretrained.where} is a {pretrained.model_name} checkpoint but "
                         f"model.name is {model_name}; use the same model.name to transfer its weights")
    source = {prefix + k: v for k, v in pretrained.weights.items()}
    target = net.state_dict()
    in_head = lambda k: k.startswith(head)  # noqa: E731
    problems = []
    for key, value in target.items():
        if in_head(key) or key.endswith("num_batches_tracked") and key not in source:
            continue
        if key not in source:
            problems.append(f"{key} is missing")
        elif source[key].shape != value.shape:
            problems.append(f"{key} has shape {list(source[key].shape)} there but {list(value.shape)} here")
    problems += [f"{key} is not in {model_name}" for key in source if key not in target and not in_head(key)]
    if problems:
        raise ModelError(f"model.pretrained: {pretrained.where} does not fit this {model_name} ({len(problems)} "
                         f"problem(s): {'; '.join(problems[:3])}); check data channels, model.width and model.name")
    head_keys = [k for k in target if in_head(k)]
    take_head = all(k in source and source[k].shape == target[k].shape for k in head_keys)
    keep = {k: v for k, v in source.items() if k in target and (take_head or not in_head(k))}
    net.load_state_dict({**target, **keep})
    return take_head


def freeze_backbone(net: nn.Module, head: str) -> None:
    """No gradients outside ``head``, and fixed BatchNorm statistics there: in train mode a
    BatchNorm would keep moving its running mean and variance, so the 'frozen' features
    would drift while the head learns."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, p in net.named_parameters():
        if not name.startswith(head):
            p.requires_grad_(False)
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.BatchNorm2d) and not f"{name}.".startswith(head):
            frozen = FrozenBatchNorm2d(module.num_features, module.eps)
            frozen.load_state_dict(module.state_dict(), strict=False)  # no num_batches_tracked there
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, frozen)
