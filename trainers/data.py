"""Image data sets as uint8 tensors, split into train/val/test, looked up by name.

Small (CIFAR-size) sets live whole in memory as one ``uint8`` tensor of shape
``(N, C, H, W)``; a worker takes its shard by rank. Sets too big for that stream through
Ray Data (``trainers.streaming``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.config import DataConfig
from trainers.configtools import ConfigError, clean_error, user_path
from trainers.preprocess import resize, to_channels
from trainers.registry import Registry

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file or field."""


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)

    def shard(self, rank: int, world_size: int, equal: bool) -> "Split":
        """Every ``world_size``-th image from ``rank``; ``equal`` drops the remainder so
        that every rank runs the same number of steps (DDP needs that)."""
        n = (len(self) // world_size) * world_size if equal else len(self)
        return Split(self.x[rank:n:world_size], self.y[rank:n:world_size])


@dataclass
class ImageData:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# A loader returns (train, test or None, class names).
DATASETS: Registry = Registry("data set")


def load_data(cfg: DataConfig) -> ImageData:
    """Load, check and split the data set named by ``cfg.name``."""
    try:
        train, test, classes = DATASETS[cfg.name](cfg)
    except (DataError, ConfigError):
        raise
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as e:  # a loader's own parser gave up
        reason = clean_error(f"{type(e).__name__}: {e}").replace("\n", " ")[:200]
        raise DataError(f"data: {cfg.name} at {cfg.root or 'its default place'!r} cannot be loaded ({reason})") \
            from None
    _check_labels(train, classes, cfg.name)
    gen = torch.Generator().manual_seed(cfg.seed)
    if test is None:
        train, test = _split_off(train, cfg.test_fraction, gen)
    else:
        _check_labels(test, classes, cfg.name)
        if test.x.shape[1:] != train.x.shape[1:]:
            raise DataError(
                f"data: test images are {tuple(test.x.shape[1:])} but training images are "
                f"{tuple(train.x.shape[1:])}; both splits need one size"
            )
    train, val = _split_off(train, cfg.val_fraction, gen)
    if cfg.limit is not None:
        train = Split(train.x[: cfg.limit], train.y[: cfg.limit])
    mean, std = channel_stats(train.x)
    return ImageData(train, val, test, classes, mean, std)


def _split_off(split: Split, fraction: float, gen: torch.Generator) -> tuple[Split, Split]:
    order = torch.randperm(len(split), generator=gen)
    n_off = max(1, int(round(len(split) * fraction)))
    rest, off = order[n_off:], order[:n_off]
    return Split(split.x[rest], split.y[rest]), Split(split.x[off], split.y[off])


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_labels(split: Split, classes: list[str], name: str) -> None:
    if len(split) == 0:
        raise DataError(f"data.name={name}: the data set has no images")
    bad = (split.y < 0) | (split.y >= len(classes))
    if bad.any():
        raise DataError(
            f"data.name={name}: {int(bad.sum())} labels lie outside 0..{len(classes) - 1} "
            f"(for example {int(split.y[bad][0])}); labels must index the {len(classes)} classes"
        )


def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.root: data set {cfg.name!r} needs a path; set data.root=PATH")
    root = user_path(cfg.root, "data.root")
    if not root.exists():
        raise DataError(f"data.root: {str(root)!r} does not exist; check the path")
    return root


@DATASETS.register("digits")
def _digits(cfg: DataConfig):
    """scikit-learn's bundled 1,797 real 8x8 handwritten digits (values 0-16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Split(x, y), None, [str(c) for c in bunch.target_names]


@DATASETS.register("synthetic")
def _synthetic(cfg: DataConfig):
    """Seeded, learnable images: each class is a smooth random pattern, with random
    contrast and noise, so a CNN learns it well but not instantly."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    c, (s, _), k, n = cfg.channels, cfg.resize_hw or (16, 16), cfg.num_classes, cfg.num_samples
    coarse = torch.rand(k, c, max(2, s // 4), max(2, s // 4), generator=gen)
    prototypes = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=gen)]
    images = prototypes[y]
    contrast = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    images = 0.5 + (images - 0.5) * contrast + 0.5 * torch.randn(images.shape, generator=gen)
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return Split(x, y.long()), None, [f"class_{i}" for i in range(k)]


@DATASETS.register("cifar10")
def _cifar10(cfg: DataConfig):
    """The CIFAR-10 python archive (torchvision's layout) under ``root``."""
    from torchvision.datasets import CIFAR10

    root = user_path(cfg.root or "./data", "data.root")
    if not cfg.download and not (root / "cifar-10-batches-py").is_dir():
        raise DataError(
            f"data.root: no CIFAR-10 archive (cifar-10-batches-py/) under {str(root)!r}; "
            "point data.root at it, or set data.download=true to fetch it"
        )
    sets = [CIFAR10(str(root), train=t, download=cfg.download) for t in (True, False)]
    train, test = (
        Split(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets))
        for d in sets
    )
    return train, test, list(sets[0].classes)


def decode_image(data: bytes, source: str, channels: int | None = None) -> torch.Tensor:
    """Encoded bytes -> uint8 (C, H, W): ``channels`` 3 or 1 converts grey/RGB/alpha, None
    keeps the file's own. The error names ``source`` when they do not decode. The one
    decoder of in-memory sets, streamed sets and predict."""
    from torchvision.io import ImageReadMode, decode_image as tv_decode

    mode = {3: ImageReadMode.RGB, 1: ImageReadMode.GRAY}.get(channels, ImageReadMode.UNCHANGED)
    try:
        img = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except Exception as e:  # torchvision raises RuntimeError or ValueError by format
        raise DataError(f"{source}: not a readable image ({type(e).__name__}: {clean_error(str(e))})") from None
    return img


def _stack(images: list[torch.Tensor], sources: list[str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """One (N, C, H, W) tensor; with ``size`` (``data.image_size``) each image is first
    resized as evaluation does (``preprocess.resize``) and brought to one channel count."""
    if size is not None:
        channels = 3 if any(img.shape[0] >= 3 for img in images) else 1
        images = [resize(to_channels(img, channels), size) for img in images]
    shapes: dict[tuple, str] = {}
    for img, src in zip(images, sources):
        shapes.setdefault(tuple(img.shape), src)
    if len(shapes) > 1:
        examples = "; ".join(f"{src} is {shape}" for shape, src in list(shapes.items())[:3])
        raise DataError(
            f"images have mixed sizes ({examples}); set data.image_size=[H, W] to resize them "
            "(or data.image_size=N for N x N)"
        )
    return torch.stack(images)


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(root: Path, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"data.root: {str(root)!r} has no class subfolders (root/<class>/*.png)")
    images, labels, sources = [], [], []
    for label, cls in enumerate(classes):
        for path in _image_files(root / cls):
            images.append(decode_image(path.read_bytes(), str(path)))
            labels.append(label)
            sources.append(str(path))
    if not images:
        raise DataError(f"data.root: no {'/'.join(IMAGE_SUFFIXES)} images under {str(root)!r}")
    return _stack(images, sources, size), torch.tensor(labels), classes


@DATASETS.register("imagefolder")
def _imagefolder(cfg: DataConfig):
    """``root/<class>/*.jpg|png``; class names are the sorted folder names."""
    x, y, classes = read_image_folder(_require_root(cfg), cfg.resize_hw)
    test = None
    if cfg.test_root:
        tx, ty, tclasses = read_image_folder(user_path(cfg.test_root, "data.test_root"), cfg.resize_hw)
        if tclasses != classes:
            raise DataError(f"data.test_root: class folders {tclasses} differ from data.root's {classes}")
        test = Split(tx, ty)
    return Split(x, y), test, classes


def parquet_files(root: Path) -> list[Path]:
    """The file itself, or a directory's ``*.parquet`` (recursively; not ``_``/``.`` names)."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith(("_", ".")))


def read_parquet_images(path: Path, need_labels: bool = True, size: tuple[int, int] | None = None):
    """A Parquet file with an encoded ``image`` column and an integer ``label`` column.

    Returns (uint8 images, int64 labels or None, class names or None from the schema's
    ``classes`` metadata).
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in ("image",) + (("label",) if need_labels else ()) if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {table.column_names}")
    blobs = table.column("image").to_pylist()
    images = [decode_image(b, f"{path} row {i}") for i, b in enumerate(blobs)]
    x = _stack(images, [f"{path} row {i}" for i in range(len(images))], size)
    y = torch.tensor(table.column("label").to_numpy().astype(np.int64)) if "label" in table.column_names else None
    meta = table.schema.metadata or {}
    classes = decode_classes(meta[b"classes"].decode()) if b"classes" in meta else None
    return x, y, classes


def decode_classes(text: str) -> list[str]:
    """Class names in Parquet metadata: a JSON list (``raysweep data convert``), or the
    older comma-joined form."""
    return json.loads(text) if text.startswith("[") else text.split(",")


def _read_parquet_split(root: Path, size: tuple[int, int] | None):
    files = parquet_files(root)
    if not files:
        raise DataError(f"data.root: no .parquet files in {str(root)!r}")
    parts = [read_parquet_images(f, size=size) for f in files]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    classes = next((p[2] for p in parts if p[2]), None)
    return Split(x, y), classes


@DATASETS.register("parquet")
def _parquet(cfg: DataConfig):
    """Parquet with ``image`` (encoded bytes) and ``label``; a directory holding
    ``train.parquet`` and ``test.parquet`` gives both splits."""
    root = _require_root(cfg)
    test_root = user_path(cfg.test_root, "data.test_root") if cfg.test_root else None
    if root.is_dir() and (root / "train.parquet").is_file():
        test_root = test_root or (root / "test.parquet" if (root / "test.parquet").is_file() else None)
        root = root / "train.parquet"
    train, classes = _read_parquet_split(root, cfg.resize_hw)
    test = _read_parquet_split(test_root, cfg.resize_hw)[0] if test_root else None
    if classes is None:
        top = int(train.y.max()) + 1 if test is None else int(max(train.y.max(), test.y.max())) + 1
        classes = [str(i) for i in range(top)]
    return train, test, classes


def write_parquet_images(path: str | os.PathLike, x: torch.Tensor, y: torch.Tensor | None, classes=None, fmt="png"):
    """Encode uint8 (N, C, H, W) images into a Parquet file in the layout ``parquet`` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torchvision.io import encode_jpeg, encode_png

    encode = encode_png if fmt == "png" else encode_jpeg
    blobs = [encode(img.contiguous()).numpy().tobytes() for img in x]
    cols = {"image": pa.array(blobs, pa.binary())}
    if y is not None:
        cols["label"] = pa.array(y.numpy().astype(np.int16))
    meta = {"classes": ",".join(classes), "format": fmt} if classes else {"format": fmt}
    pq.write_table(pa.table(cols).replace_schema_metadata(meta), path)

