"""Readers for inference (`raysweep predict`): the same listing and decoder as training
(``trainers.streaming``), but every input gives exactly one row. An input that cannot be
read or decoded, or that does not fit the model, carries its reason in ``error`` instead of
failing the whole job."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import torch

from trainers.data import IMAGE_SUFFIXES, DataError, decode_image
from trainers.preprocess import resize
from trainers.streaming import DecodeSpec, prepare
from trainers.uris import file_info, open_location
from trainers.uris import short as _short

NO_LABEL = -1  # an input without a (known) label
SKIP_LABEL = -2  # a row the reader drops (predict --unknown-classes skip)


@dataclass(frozen=True)
class ImageListing:
    """An image folder as prediction reads it: images in class folders (``root/<class>/...``,
    at any depth, as training lists them) and images directly under the root (no class)."""

    location: str
    files: tuple[str, ...]  # local paths or URIs, sorted
    folders: tuple[str, ...]  # each file's class folder; "" for a file directly under the root
    others: int  # files without an image suffix (not inputs)


def list_images(location: str, role: str = "data.root") -> ImageListing:
    from trainers.uris import as_uri

    fs, path = open_location(location, role)
    if file_info(fs, path, location, role).type != pafs.FileType.Directory:
        raise DataError(f"{role} {location!r} is not a directory (want DIR/<class>/*.png and/or DIR/*.png)")
    base = path.rstrip("/")
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise DataError(f"{role} {location!r}: cannot list ({_short(e)})") from None
    found, others = [], 0
    for i in entries:
        if i.type != pafs.FileType.File:
            continue
        rel = i.path[len(base) + 1:]
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            others += 1
            continue
        found.append((as_uri(location, i.path), rel.split("/", 1)[0] if "/" in rel else ""))
    found.sort()
    return ImageListing(location, tuple(f for f, _ in found), tuple(d for _, d in found), others)


def evaluation_spec(image_shape, resize_hw=None) -> DecodeSpec:
    """The evaluation transform of a run whose images are ``image_shape`` (C, H, W) and whose
    ``data.image_size`` was ``resize_hw`` (checkpoint ``meta["preprocess"]["resize"]``)."""
    shape = tuple(int(s) for s in image_shape)
    size = (int(resize_hw[0]), int(resize_hw[1])) if resize_hw else None
    return DecodeSpec(shape[0], size, shape, None, (0.0, 1.0), 0)


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def read_files(batch: dict) -> dict:
    """Ray Data ``map_batches``: ``id`` (a path or URI) -> its ``bytes``, file by file, so
    that one unreadable file gives one ``error`` row (``read_binary_files`` fails the job)."""
    from trainers.uris import read_bytes

    data, errors = [], []
    for path in batch["id"]:
        try:
            data.append(read_bytes(str(path)))
            errors.append("")
        except OSError as e:
            data.append(b"")
            errors.append(f"{path}: cannot read ({_short(e, 200)})")
    return {"id": batch["id"], "label": batch["label"], "bytes": _objects(data), "error": _objects(errors)}


def row_groups(files) -> list[dict]:
    """Work items of Parquet ``files`` (paths or URIs): one per row group, with the index of
    its first row in the file (rows are named ``file#row``)."""
    from trainers.uris import open_parquet

    items = []
    for f in files:
        meta = open_parquet(f).metadata
        first = 0
        for g in range(meta.num_row_groups):
            items.append({"file": f, "row_group": g, "first_row": first})
            first += meta.row_group(g).num_rows
    return items


def read_row_groups(batch: dict, label_maps: dict | None = None) -> dict:
    """Ray Data ``map_batches``: row-group work items (``row_groups``) -> one row per image
    with ``id`` (the ``id`` column, else ``file#row``), ``label`` (file label -> ``label_maps
    [file][label]`` where given; null -> ``NO_LABEL``; ``SKIP_LABEL`` rows dropped), the
    encoded ``bytes`` and ``error`` (an empty cell)."""
    from trainers.uris import open_parquet

    out = {"id": [], "label": [], "bytes": [], "error": []}
    for file, group, first in zip(batch["file"], batch["row_group"], batch["first_row"]):
        pfile = open_parquet(str(file))
        cols = [c for c in ("image", "label", "id") if c in pfile.schema_arrow.names]
        table = pfile.read_row_group(int(group), columns=cols)
        n = table.num_rows
        ids = ([str(v) for v in table.column("id").to_pylist()] if "id" in cols
               else [f"{file}#{int(first) + i}" for i in range(n)])
        raw = table.column("label").to_pylist() if "label" in cols else [None] * n
        lm = (label_maps or {}).get(str(file))
        for source, v, blob in zip(ids, raw, table.column("image").to_pylist()):
            label = NO_LABEL if v is None else (lm[v] if lm is not None else int(v))
            if label == SKIP_LABEL:
                continue
            out["id"].append(source)
            out["label"].append(label)
            out["bytes"].append(blob or b"")
            out["error"].append("" if blob else f"{source}: empty image cell")
    return {"id": _objects(out["id"]), "label": np.asarray(out["label"], dtype=np.int64),
            "bytes": _objects(out["bytes"]), "error": _objects(out["error"])}


def _fit_problem(img: torch.Tensor, spec: DecodeSpec) -> str | None:
    if tuple(img.shape) == spec.shape:
        return None
    fix = ("resize / convert it to the training size and channels, or train with data.image_size "
           "so that the checkpoint resizes inputs")
    return (f"image is {'x'.join(map(str, img.shape))} (CxHxW) but the model takes "
            f"{'x'.join(map(str, spec.shape))}; {fix}")


def decode_rows(batch: dict, spec: DecodeSpec) -> dict:
    """Ray Data ``map_batches``: encoded ``bytes`` -> uint8 ``image`` of ``spec.shape``, row by
    row. With ``spec.size`` each image goes through ``prepare``, the evaluation transform of
    a streamed run (channels converted, resized, centre-cropped); without, it must already
    have the model's shape. Anything else becomes that row's ``error``."""
    images = np.zeros((len(batch["id"]), *spec.shape), dtype=np.uint8)
    errors = [str(e) for e in batch["error"]]
    for i, (source, blob) in enumerate(zip(batch["id"], batch["bytes"])):
        if errors[i]:
            continue
        try:
            img = prepare(bytes(blob), spec, str(source)) if spec.size else decode_image(bytes(blob), str(source))
        except DataError as e:
            errors[i] = str(e)
            continue
        _place(img, i, source, spec, images, errors)
    return {"id": batch["id"], "label": batch["label"], "image": images, "error": _objects(errors)}


def _place(img: torch.Tensor, i: int, source, spec: DecodeSpec, images: np.ndarray, errors: list[str]) -> None:
    """Row ``i`` gets the image, or the reason it does not fit the model."""
    if problem := _fit_problem(img, spec):
        errors[i] = f"{source}: {problem}"
    else:
        images[i] = img.numpy()


def conform_rows(batch: dict, spec: DecodeSpec) -> dict:
    """Ray Data ``map_batches``: already decoded uint8 ``image`` rows (a registered data set)
    -> ``spec.shape``: resized as the in-memory evaluation does (``to_channels`` + ``resize``)
    where the run had ``data.image_size``, else an ``error`` naming both shapes."""
    from trainers.preprocess import to_channels

    images = np.zeros((len(batch["id"]), *spec.shape), dtype=np.uint8)
    errors = [""] * len(batch["id"])
    for i, (source, pixels) in enumerate(zip(batch["id"], batch["image"])):
        img = torch.from_numpy(np.array(pixels))  # a writable copy: Ray Data's arrays are read-only
        if spec.size and tuple(img.shape) != spec.shape:
            img = resize(to_channels(img, spec.channels), spec.size)
        _place(img, i, source, spec, images, errors)
    return {"id": batch["id"], "label": batch["label"], "image": images, "error": _objects(errors)}
