"""Image sets streamed through Ray Data: read, decode and resize on CPU workers of any node.

The driver lists the files, reads row counts from Parquet footers and decodes a small
sample (normalisation, image shape, channels); it never decodes or holds the whole set.
Each split is a lazy ``ray.data.Dataset`` of ``image`` (uint8 ``(C, H, W)``) and
``label`` (int64) that Ray Train hands to each worker as its shard.

Splits without their own files are carved by a seeded hash of each image's encoded
bytes (``split_band``): the same image lands in the same split on every epoch, node
and run, and nothing has to be counted first.

Shuffling: training files are read in a new order every epoch (Ray Data's file
shuffle, reseeded per execution), and each worker draws its batches from a local buffer
of ``data.shuffle_buffer`` images. That mixes images across files only within the
buffer: a shard written class by class would still reach a worker in runs of one
class. ``raysweep data convert`` therefore shuffles images before writing shards.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from trainers.config import DataConfig
from trainers.data import IMAGE_SUFFIXES, DataError, channel_stats, decode_classes, decode_image
from trainers.preprocess import resize
from trainers.uris import file_info, open_location
from trainers.uris import short as _short

if TYPE_CHECKING:
    from trainers.data import ImageData

# ``auto`` streams a set whose decoded training images exceed this, or a tenth of the
# machine's memory, whichever is less: decoded sets below it train faster from memory.
STREAM_ABOVE_BYTES = 2 * 2**30
DECODE_CPUS = 1.0  # each decode task's CPUs, which must stay free beside the training workers
SAMPLE_IMAGES = 512  # decoded on the driver for normalisation, shape and channels
STREAMED_KINDS = ("parquet", "imagefolder")


def open_fs(location: str) -> tuple[pafs.FileSystem, str]:
    return open_location(location, "data.root")


def _info(fs: pafs.FileSystem, path: str, location: str) -> pafs.FileInfo:
    return file_info(fs, path, location, "data.root")


def _listing(fs: pafs.FileSystem, path: str, location: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise DataError(f"data.root {location!r}: cannot list ({_short(e)})") from None


@dataclass(frozen=True)
class Source:
    """The files of one split: Parquet shards, or image files whose parent folder is the class."""

    kind: str
    location: str  # what the user gave (for messages); files are paths within its filesystem
    files: tuple[str, ...]
    rows: int  # images in the files, before any carving into splits
    root: str = ""  # ``location``'s path within its filesystem (image folders' labels are relative to it)


def _hidden(path: str) -> bool:
    """Spark's and raysweep's own bookkeeping files (``_SUCCESS``, ``.partial``)."""
    return path.rsplit("/", 1)[-1].startswith(("_", "."))


def list_parquet(location: str) -> Source:
    fs, path = open_fs(location)
    info = _info(fs, path, location)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.root: {location!r} does not exist; check the path")
    if info.type == pafs.FileType.File:
        files = [path]
    else:
        files = sorted(i.path for i in _listing(fs, path, location)
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not _hidden(i.path))
    if not files:
        raise DataError(f"data.root: no .parquet files in {location!r}")
    return Source("parquet", location, tuple(files), sum(_parquet_rows(fs, f) for f in files), path)


def _parquet_file(fs: pafs.FileSystem, path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({_short(e)})") from None


def _parquet_rows(fs: pafs.FileSystem, path: str) -> int:
    return _parquet_file(fs, path).metadata.num_rows


def parquet_classes(fs: pafs.FileSystem, files: tuple[str, ...]) -> list[str]:
    """Class names from the first file's ``classes`` metadata (a JSON list, or the older
    comma-joined form), else ``0..max label`` read from the label columns alone."""
    first = _parquet_file(fs, files[0])
    meta = first.schema_arrow.metadata or {}
    if b"classes" in meta:
        return decode_classes(meta[b"classes"].decode())
    if "label" not in first.schema_arrow.names:
        raise DataError(f"{files[0]}: no 'label' column; found {first.schema_arrow.names}")
    if not pa.types.is_integer(kind := first.schema_arrow.field("label").type):
        raise DataError(f"{files[0]}: the 'label' column is {kind}; labels are whole numbers (class indices)")
    top = max(int(np.max(_parquet_file(fs, f).read(columns=["label"]).column("label").to_numpy(), initial=0))
              for f in files)
    return [str(i) for i in range(top + 1)]


def list_image_folder(location: str) -> tuple[Source, list[str]]:
    fs, path = open_fs(location)
    info = _info(fs, path, location)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"data.root: {location!r} is not a directory of class folders (root/<class>/*.jpg)")
    base = path.rstrip("/")
    files, classes = [], set()
    for i in _listing(fs, path, location):
        rel = i.path[len(base) + 1:]
        if i.type == pafs.FileType.File and "/" in rel and rel.lower().endswith(IMAGE_SUFFIXES):
            files.append(i.path)
            classes.add(rel.split("/", 1)[0])
    if not files:
        raise DataError(f"data.root: no {'/'.join(IMAGE_SUFFIXES)} images in class folders under {location!r}")
    return Source("imagefolder", location, tuple(sorted(files)), len(files), path), sorted(classes)


@dataclass(frozen=True)
class DecodeSpec:
    """How one split's rows become tensors; travels to Ray Data's workers."""

    channels: int
    size: tuple[int, int] | None  # (H, W) after resizing; None keeps each image's size
    shape: tuple[int, int, int]  # the (C, H, W) every image must have in the end
    train_crop: str | None  # None: the evaluation resize (centre crop)
    band: tuple[float, float]  # keep rows whose hash lies in [low, high)
    seed: int
    root: str = ""  # imagefolder: the path that class folders sit under
    classes: tuple[str, ...] = ()


def split_band(data: bytes, seed: int) -> float:
    """A number in [0, 1) fixed by the image's bytes and the seed: which split it is in."""
    return zlib.crc32(data, seed & 0xFFFFFFFF) / 2**32


def prepare(data: bytes, spec: DecodeSpec, source: str) -> torch.Tensor:
    img = decode_image(data, source, spec.channels)
    if spec.size is not None:
        img = resize(img, spec.size, spec.train_crop)
    if tuple(img.shape) != spec.shape:
        raise DataError(f"{source}: image is {tuple(img.shape)} but the set's images are {spec.shape}; "
                        "set data.image_size=[H, W] to resize images of mixed sizes")
    return img


def decode_batch(batch: dict, spec: DecodeSpec) -> dict:
    """Ray Data ``map_batches`` function: the rows of ``spec.band``, decoded and resized."""
    blobs = batch["image"] if "image" in batch else batch["bytes"]
    sources = batch.get("path")
    images, labels = [], []
    for i, data in enumerate(blobs):
        if not spec.band[0] <= split_band(data, spec.seed) < spec.band[1]:
            continue
        source = str(sources[i]) if sources is not None else f"row {i}"
        images.append(prepare(data, spec, source).numpy())
        labels.append(_label(batch, i, spec, source))
    if not images:
        # A batch with no row of this split: Ray Data cannot infer a tensor column from an
        # empty array (it warns and pickles the block), so hand it the typed empty table.
        import pyarrow as pa
        from ray.data.extensions import ArrowTensorArray

        return pa.table({"image": ArrowTensorArray.from_numpy(np.zeros((0, *spec.shape), np.uint8)),
                         "label": np.zeros(0, np.int64)})
    return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.int64)}


def _label(batch: dict, i: int, spec: DecodeSpec, source: str) -> int:
    if "label" in batch:
        return int(batch["label"][i])
    folder = str(batch["path"][i])[len(spec.root.rstrip("/")) + 1:].split("/", 1)[0]
    try:
        return spec.classes.index(folder)
    except ValueError:
        raise DataError(f"{source}: class folder {folder!r} is not one of the training classes") from None


@dataclass(frozen=True)
class StreamPlan:
    """Everything the workers need besides the datasets: small, plain, picklable."""

    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shape: tuple[int, int, int]
    train_rows: int  # expected training images (the carving is by hash, so about this many)
    val_rows: int
    test_rows: int
    sample: torch.Tensor = field(repr=False)  # uint8 (n, C, H, W): e.g. fast_cifar's whitening
    sources: dict = field(repr=False, default_factory=dict)  # split -> (Source, DecodeSpec)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _sources(cfg: DataConfig) -> tuple[Source, Source | None, list[str]]:
    if cfg.name == "imagefolder":
        train, classes = list_image_folder(_need_root(cfg))
        test = None
        if cfg.test_root:
            test, test_classes = list_image_folder(cfg.test_root)
            if test_classes != classes:
                raise DataError(f"data.test_root: class folders {test_classes} differ from data.root's {classes}")
        return train, test, classes
    root, test_root = _need_root(cfg), cfg.test_root
    fs, path = open_fs(root)
    if _info(fs, path, root).type == pafs.FileType.Directory and not test_root:
        pair = {n: f"{root.rstrip('/')}/{n}.parquet" for n in ("train", "test")}
        if _info(fs, f"{path.rstrip('/')}/train.parquet", root).type == pafs.FileType.File:
            root = pair["train"]
            if _info(fs, f"{path.rstrip('/')}/test.parquet", root).type == pafs.FileType.File:
                test_root = pair["test"]
    train = list_parquet(root)
    test = list_parquet(test_root) if test_root else None
    return train, test, parquet_classes(fs, train.files)  # the same filesystem as root's


def _need_root(cfg: DataConfig) -> str:
    if not cfg.root:
        raise DataError(f"data.root: data set {cfg.name!r} needs a path or URI; set data.root=PATH")
    return cfg.root


def _sample_blobs(source: Source, count: int) -> list[tuple[bytes, str]]:
    """About ``count`` encoded images spread over the files (the first rows of evenly spaced
    Parquet files, or evenly spaced image files)."""
    fs, _ = open_fs(source.location)
    if source.kind == "imagefolder":
        step = max(1, len(source.files) // count)
        return [(_read(fs, f), f) for f in source.files[::step][:count]]
    picks = source.files[::max(1, math.ceil(len(source.files) / 8))]  # at most ~8 files opened
    out = []
    for f in picks:
        batch = next(_parquet_file(fs, f).iter_batches(batch_size=max(1, count // len(picks)), columns=["image"]), None)
        out += [(b, f"{f} row {i}") for i, b in enumerate(batch.column(0).to_pylist())] if batch is not None else []
    return out[:count]


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read()


def plan_stream(cfg: DataConfig) -> StreamPlan:
    """List the files, decode a sample and make each split's decode spec (driver side)."""
    if cfg.name not in STREAMED_KINDS:
        raise DataError(f"data.streaming: data set {cfg.name!r} cannot stream; stream {' or '.join(STREAMED_KINDS)} "
                        "(raysweep data convert makes Parquet shards), or set data.streaming=false")
    train, test, classes = _sources(cfg)
    blobs = _sample_blobs(train, SAMPLE_IMAGES)
    raw = [decode_image(b, src, 3) for b, src in blobs[:64]]
    channels = 1 if all(_is_grey(img) for img in raw) else 3
    size = cfg.resize_hw
    first = decode_image(blobs[0][0], blobs[0][1], channels)
    shape = (channels, *(size or tuple(first.shape[-2:])))
    eval_spec = DecodeSpec(channels, size, shape, None, (0.0, 1.0), cfg.seed, classes=tuple(classes))
    sample = torch.stack([prepare(b, eval_spec, src) for b, src in blobs])
    t = 0.0 if test is not None else cfg.test_fraction
    v = t + cfg.val_fraction * (1 - t)
    crop = cfg.train_crop if size is not None else None
    specs = {"train": (train, replace(eval_spec, band=(v, 1.0), train_crop=crop)),
             "val": (train, replace(eval_spec, band=(t, v))),
             "test": (test, eval_spec) if test is not None else (train, replace(eval_spec, band=(0.0, t)))}
    specs = {k: (src, replace(spec, root=src.root)) for k, (src, spec) in specs.items()}
    mean, std = channel_stats(sample)
    return StreamPlan(classes, mean, std, shape, train_rows=round(train.rows * (1 - v)),
                      val_rows=round(train.rows * (v - t)), test_rows=test.rows if test else round(train.rows * t),
                      sample=sample, sources=specs)


def _is_grey(img: torch.Tensor) -> bool:
    return bool((img[0] == img[1]).all() and (img[1] == img[2]).all())


def should_stream(cfg: DataConfig, decoded_bytes: int | None = None) -> bool:
    """``data.streaming``: true, false, or (auto) URIs and sets too big to decode whole."""
    mode = cfg.streaming_mode
    if mode != "auto":
        return mode == "true"
    if cfg.name not in STREAMED_KINDS:
        return False
    if cfg.is_uri:
        return True
    return decoded_bytes is not None and decoded_bytes > stream_threshold_bytes()


def stream_threshold_bytes() -> int:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not on every platform
        memory = 16 * 2**30
    return min(STREAM_ABOVE_BYTES, memory // 10)


def estimate_decoded_bytes(cfg: DataConfig) -> int | None:
    """The training set's decoded size, from the file listing and a few images; None when
    the set is not one that streams."""
    if cfg.name not in STREAMED_KINDS or not cfg.root:
        return None
    train, _, _ = _sources(cfg)
    blobs = _sample_blobs(train, 8)
    if not blobs:
        return None
    img = decode_image(blobs[0][0], blobs[0][1], 3)
    h, w = cfg.resize_hw or tuple(img.shape[-2:])
    return train.rows * 3 * h * w


def build_dataset(plan: StreamPlan, split: str):
    """The lazy Ray Dataset of ``split`` (``train``, ``val`` or ``test``)."""
    import ray.data

    # Datasets carry the context they were made in to the workers that run them. Ray Data's
    # progress bars redraw many lines per second in a job's log; our epoch lines say enough.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False

    source, spec = plan.sources[split]
    fs, _ = open_fs(source.location)
    shuffle = ray.data.FileShuffleConfig(seed=spec.seed, reseed_after_execution=True) if split == "train" else None
    if source.kind == "parquet":
        # select_columns, not read_parquet's deprecated columns= (Ray 2.58-2.60 do the same inside)
        ds = ray.data.read_parquet(list(source.files), filesystem=fs, shuffle=shuffle)
        ds = ds.select_columns(["image", "label"])
    else:
        ds = ray.data.read_binary_files(list(source.files), filesystem=fs, include_paths=True, shuffle=shuffle)
    return ds.map_batches(decode_batch, fn_kwargs={"spec": spec}, batch_format="numpy", batch_size=64,
                          num_cpus=DECODE_CPUS)


def build_datasets(plan: StreamPlan, splits=("train", "val")) -> dict:
    return {split: build_dataset(plan, split) for split in splits}


def torch_batches(iterable, batch_size: int, device: torch.device, shuffle_buffer: int = 0,
                  seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, int64 labels) batches from a Ray Dataset or a worker's shard of one."""
    kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed} if shuffle_buffer else {}
    for batch in iterable.iter_torch_batches(batch_size=batch_size, device=device, **kwargs):
        yield batch["image"], batch["label"]


def load_for_training(cfg) -> "ImageData | StreamPlan":
    """The data of a run (``TrainRunConfig``), decided by ``data.streaming``: the whole set
    decoded in memory (``ImageData``), or the plan of a streamed one. On the driver,
    before any Ray process starts, so that data errors come first."""
    from trainers.data import load_data

    data_cfg = cfg.data
    size_matters = data_cfg.streaming_mode == "auto" and not data_cfg.is_uri  # URIs stream anyway
    stream = should_stream(data_cfg, estimate_decoded_bytes(data_cfg) if size_matters else None)
    if not stream:
        if data_cfg.is_uri:
            raise DataError(f"data.streaming=false: {data_cfg.root!r} is a URI, which only streams; "
                            "set data.streaming=auto, or copy the set to a local path")
        return _trainable(load_data(data_cfg), data_cfg)
    if cfg.augment.alternate_flip:
        raise DataError("augment.alternate_flip: needs the in-memory path (each image's flip alternates by its "
                        "index); set augment.alternate_flip=false or data.streaming=false")
    return _trainable(plan_stream(data_cfg), data_cfg)


def _trainable(data, data_cfg):
    """``data`` if a classifier can learn from it: one class (a folder of one subfolder) trained
    to a meaningless 100% before. Predict may read one class; training may not."""
    if data.num_classes < 2:
        raise DataError(f"data: {data_cfg.name} at {data_cfg.root or 'its default place'!r} has "
                        f"{data.num_classes} class ({', '.join(map(str, data.classes)) or 'none'}); a classifier "
                        "needs at least 2 (for imagefolder: one subfolder per class)")
    return data
