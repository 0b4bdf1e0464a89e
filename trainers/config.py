"""The validated configuration of one training run: one dataclass per concern.

A YAML file mirrors these sections; every key has a default, so a file gives only what
differs. ``TrainRunConfig.from_dict`` reports every problem at once (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainers.configtools import choice_problem, from_dict, range_problem, to_dict
from trainers.preprocess import TRAIN_CROPS


def _known(kind: str) -> list[str]:
    # Imported lazily: the registries' modules import this one for their config types.
    from trainers import augment, data, losses, models, optim, tta  # noqa: F401

    return {
        "data set": data.DATASETS,
        "model": models.MODELS,
        "loss": losses.LOSSES,
        "optimizer": optim.OPTIMIZERS,
        "schedule": optim.SCHEDULES,
        "test-time augmentation": tta.TTA,
    }[kind].names()


def _drop_none(problems):
    return [p for p in problems if p]


STREAMING = ("auto", "true", "false")


def _size_problem(size) -> str | None:
    """None when ``size`` is an int or a pair of ints in 4..4096."""
    sides = [size] if isinstance(size, int) and not isinstance(size, bool) else size
    if size is None:
        return None
    if (isinstance(sides, (list, tuple)) and len(sides) in (1, 2)
            and all(isinstance(v, int) and not isinstance(v, bool) and 4 <= v <= 4096 for v in sides)):
        return None
    return f"image_size: {str(size)[:40]!r} must be N or [H, W], whole numbers in 4..4096 (e.g. 64 or [96, 128])"


SEED_MAX = 2**32 - 1  # what numpy's and Optuna's seeds take
EPOCHS_MAX = 10_000  # train.epochs and tune's --max-epochs: bounds what a config can make us run
SYNTHETIC_BYTES = 4 * 2**30  # the synthetic set is made at once in float32


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split.

    ``root`` is the data set's path (a directory, or a Parquet file or directory);
    ``test_root`` a separate test source. Data sets without a test split (digits,
    synthetic, imagefolder, parquet without ``test_root``) carve one out of the
    training data with ``test_fraction``; the validation split is always carved from
    the training data, seeded by ``seed``. ``num_samples``, ``channels`` and
    ``num_classes`` shape the ``synthetic`` set; ``limit`` caps the training images of
    any set (quick runs). ``root`` and ``test_root`` may be pyarrow.fs URIs
    (``s3://``, ``gs://``, ``file://``) for ``parquet`` and ``imagefolder``.

    ``image_size`` (``N`` or ``[H, W]``) resizes every image (mixed sizes welcome), the
    torchvision ImageNet way: evaluation resizes the shorter side to ``size / 0.875`` and
    takes the centre crop; streamed training takes ``train_crop``: ``random_resized``
    (RandomResizedCrop, scale 0.08-1) or ``random`` (the evaluation resize, then a random
    crop). The synthetic set is generated at ``image_size`` (default 16).

    ``streaming``: ``auto`` streams a set through Ray Data when its decoded training
    images would exceed ``STREAM_ABOVE_BYTES`` (or a tenth of this machine's memory), or
    when ``root`` is a URI; ``true`` always, ``false`` never (the set is decoded whole on
    the driver). ``shuffle_buffer`` is the streamed training shuffle's buffer, in images.
    """

    name: str = "digits"
    root: str | None = None
    test_root: str | None = None
    download: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    limit: int | None = None
    seed: int = 0
    num_samples: int = 2000
    image_size: Any | None = None  # N or [H, W]; see resize_hw
    channels: int = 3
    num_classes: int = 10
    train_crop: str = "random_resized"
    streaming: Any = "auto"  # auto | true | false (YAML's booleans too)
    shuffle_buffer: int = 2048

    @property
    def resize_hw(self) -> tuple[int, int] | None:
        """``image_size`` as (H, W), or None when images keep their size."""
        size = self.image_size
        if size is None or _size_problem(size):
            return None
        sides = [size] if isinstance(size, int) else list(size)
        return int(sides[0]), int(sides[-1])

    @property
    def streaming_mode(self) -> str:
        """``auto``, ``true`` or ``false``, whichever way YAML spelled it."""
        return str(self.streaming).lower()

    @property
    def is_uri(self) -> bool:
        return any("://" in (r or "") for r in (self.root, self.test_root))

    def _synthetic_problem(self) -> str | None:
        """The synthetic set is made in memory as float32 at once: bound what it takes."""
        if self.name != "synthetic" or _size_problem(self.image_size) or not isinstance(self.num_samples, int):
            return None
        h, w = self.resize_hw or (16, 16)
        need = self.num_samples * self.channels * h * w * 4
        if need <= SYNTHETIC_BYTES:
            return None
        return (f"num_samples: {self.num_samples} synthetic images of {self.channels}x{h}x{w} would take "
                f"{need / 2**30:.3g} GiB while they are made; at most {SYNTHETIC_BYTES // 2**30} GiB: fewer or "
                "smaller images")

    def problems(self) -> list[str]:
        return _drop_none(
            [
                choice_problem("name", self.name, _known("data set"), "data set"),
                range_problem("val_fraction", self.val_fraction, 0.0, 0.9, low_open=True),
                range_problem("test_fraction", self.test_fraction, 0.0, 0.9, low_open=True),
                range_problem("limit", self.limit, 1),
                range_problem("num_samples", self.num_samples, 10, 100_000_000),
                _size_problem(self.image_size),
                range_problem("seed", self.seed, 0, SEED_MAX),
                self._synthetic_problem(),
                choice_problem("train_crop", self.train_crop, TRAIN_CROPS, "training crop"),
                choice_problem("streaming", self.streaming_mode, STREAMING, "streaming mode"),
                range_problem("shuffle_buffer", self.shuffle_buffer, 0, 1_000_000),
                range_problem("channels", self.channels, 1, 4),
                range_problem("num_classes", self.num_classes, 2, 1000),
            ]
        )


@dataclass(frozen=True)
class ModelConfig:
    """The network. ``dropout`` applies before the classifier of every model with a head.

    ``pretrained`` is a raysweep run or checkpoint (any model), or for resnet50 a .pth file
    or ``imagenet`` for torchvision's file in the torch cache; raysweep never downloads
    weights (``trainers.transfer``). ``freeze_backbone`` trains only the head. ``input_size``
    resizes images inside the model (e.g. 224 for ImageNet weights).
    """

    name: str = "simple_cnn"
    dropout: float = 0.0
    pretrained: str | None = None
    freeze_backbone: bool = False
    input_size: int | None = None
    width: int = 1

    def problems(self) -> list[str]:
        return _drop_none(
            [
                choice_problem("name", self.name, _known("model"), "model"),
                range_problem("dropout", self.dropout, 0.0, 0.95),
                range_problem("input_size", self.input_size, 8, 1024),
                range_problem("width", self.width, 1, 8),
            ]
        )


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule.

    ``weight_decay`` is L2 (decoupled for ``adamw``); ``l1`` adds ``l1 * sum(|w|)`` to
    the loss. ``momentum``/``nesterov`` apply to ``momentum``. ``warmup_epochs`` ramps the
    rate up linearly; ``onecycle`` with no warm-up rises over the first 30% of training,
    ``triangle`` (airbench's) over 23%. ``norm_bias_lr_scale`` multiplies the rate of
    normalisation-layer biases (and divides their weight decay); ``lookahead_every`` > 0
    averages the weights into a slow copy every that many steps (see ``optim.Lookahead``).
    """

    name: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    l1: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    norm_bias_lr_scale: float = 1.0
    lookahead_every: int = 0

    def problems(self) -> list[str]:
        return _drop_none(
            [
                choice_problem("name", self.name, _known("optimizer"), "optimizer"),
                range_problem("norm_bias_lr_scale", self.norm_bias_lr_scale, 0.0, 1000.0, low_open=True),
                range_problem("lookahead_every", self.lookahead_every, 0, 1000),
                choice_problem("schedule", self.schedule, _known("schedule"), "schedule"),
                range_problem("lr", self.lr, 0.0, 100.0, low_open=True),
                range_problem("weight_decay", self.weight_decay, 0.0, 1.0),
                range_problem("l1", self.l1, 0.0, 1.0),
                range_problem("momentum", self.momentum, 0.0, 0.999),
                range_problem("warmup_epochs", self.warmup_epochs, 0.0),
            ]
        )


@dataclass(frozen=True)
class LossConfig:
    name: str = "cross_entropy"
    label_smoothing: float = 0.0

    def problems(self) -> list[str]:
        return _drop_none(
            [
                choice_problem("name", self.name, _known("loss"), "loss"),
                range_problem("label_smoothing", self.label_smoothing, 0.0, 0.5),
            ]
        )


FILLS = ("zeros", "reflection")  # F.grid_sample's padding modes that augmentation offers


@dataclass(frozen=True)
class AugmentConfig:
    """Batch-wise training augmentation; 0 turns each one off.

    ``rotation`` in degrees (uniform in ±rotation), ``shift`` as a fraction of width and
    height, ``flip`` the probability of a horizontal flip, ``crop_padding`` in pixels
    (random crop of the padded image). ``alternate_flip`` (with ``flip`` 0.5): a fixed
    random half of the images is flipped in odd epochs and the other half in even ones, so
    each epoch shows every image the other way round from the epoch before (airbench's
    alternating flip: less repetition than a fresh coin per image and epoch). ``fill``: what
    the pixels moved in from outside the image show, ``zeros`` (the data mean, once
    normalised) or ``reflection`` (the image mirrored at its edge, like airbench's padding).
    """

    rotation: float = 0.0
    shift: float = 0.0
    flip: float = 0.0
    crop_padding: int = 0
    alternate_flip: bool = False
    fill: str = "zeros"

    def problems(self) -> list[str]:
        return _drop_none(
            [
                range_problem("rotation", self.rotation, 0.0, 180.0),
                range_problem("shift", self.shift, 0.0, 0.5),
                range_problem("flip", self.flip, 0.0, 1.0),
                range_problem("crop_padding", self.crop_padding, 0, 64),
                choice_problem("fill", self.fill, FILLS, "fill"),
                (f"alternate_flip: true flips each image every other epoch, so it needs flip 0.5, not "
                 f"{self.flip!r}; set flip: 0.5 or alternate_flip: false")
                if self.alternate_flip and self.flip != 0.5 else None,
            ]
        )


EARLY_STOP_METRICS = {"val_loss": "min", "val_accuracy": "max", "val_f1": "max"}


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` epochs (0 = off).

    ``metric`` also picks the best checkpoint, whichever the patience.
    """

    metric: str = "val_accuracy"
    patience: int = 0
    min_delta: float = 0.0

    @property
    def mode(self) -> str:
        return EARLY_STOP_METRICS[self.metric]

    def problems(self) -> list[str]:
        return _drop_none(
            [
                choice_problem("metric", self.metric, EARLY_STOP_METRICS, "metric"),
                range_problem("patience", self.patience, 0),
                range_problem("min_delta", self.min_delta, 0.0),
            ]
        )


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """The loop. ``batch_size`` is global (split across workers).

    ``precision``: ``auto`` is bf16 on GPUs and on CPUs with native bf16 (AVX-512 BF16 or
    AMX), else fp32, since bf16 is emulated, and slow, on other CPUs. ``fp16`` uses a loss
    scaler (GPUs without bf16). ``max_failures`` is how often Ray Train restarts failed
    workers from the last checkpoint. ``checkpoint_every_minutes`` (0: off) adds checkpoints
    inside long epochs, each with its position (step, data order, RNG states), so a restarted
    run continues mid-epoch; a preempted worker (SIGTERM) checkpoints at the next step anyway.
    ``tta`` (``trainers.tta``: none, flip, flip_translate) scores the final test evaluation,
    and predict/export by default; per-epoch validation stays plain, so selection is unchanged.
    """

    epochs: int = 12
    batch_size: int = 64
    precision: str = "auto"
    seed: int = 0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint_every: int = 1
    max_failures: int = 2
    channels_last: bool = True
    checkpoint_every_minutes: float = 0.0
    tta: str = "none"

    def problems(self) -> list[str]:
        return _drop_none(
            [
                range_problem("epochs", self.epochs, 1, EPOCHS_MAX),
                range_problem("batch_size", self.batch_size, 1, 65_536),
                range_problem("seed", self.seed, 0, SEED_MAX),
                choice_problem("precision", self.precision, PRECISIONS, "precision"),
                range_problem("checkpoint_every", self.checkpoint_every, 1),
                range_problem("max_failures", self.max_failures, 0),
                range_problem("checkpoint_every_minutes", self.checkpoint_every_minutes, 0),
                choice_problem("tta", self.tta, _known("test-time augmentation"), "test-time augmentation"),
            ]
        )


SECTIONS = ("data", "model", "optim", "loss", "augment", "train")


@dataclass(frozen=True)
class TrainRunConfig:
    """Everything one training run needs; travels to Ray workers as a plain dict."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "TrainRunConfig":
        return from_dict(cls, values)

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **sections) -> "TrainRunConfig":
        return dataclasses.replace(self, **sections)


def load_run_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> TrainRunConfig:
    """A YAML file (optional) plus ``section.key=value`` overrides -> validated config.

    Every problem, in the file and the overrides alike, is reported in one ``ConfigError``.
    """
    return TrainRunConfig.from_dict(load_run_values(path, overrides))


def load_run_values(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """What the user set, as a nested dict (only the keys they gave), after checking that it
    makes a valid config; ``load_run_config`` builds the config from it."""
    from trainers.configtools import ConfigError, load_yaml, parse_override, set_path

    values = load_yaml(path) if path is not None else {}  # '' is refused, not ignored
    problems = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as e:
            problems += e.problems
            continue
        set_path(values, key, value)
    if isinstance(values.get("model"), dict) and isinstance(values["model"].get("pretrained"), str):
        from trainers.transfer import absolute_location  # workers run in another directory

        values["model"]["pretrained"] = absolute_location(values["model"]["pretrained"])
    try:
        TrainRunConfig.from_dict(values)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return values
