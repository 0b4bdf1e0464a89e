"""Image folder -> Parquet shards in the layout ``data.name=parquet`` reads.

``SRC/<class>/*.jpg|png|...`` (local or any pyarrow.fs URI) becomes ``DST/part-00000.parquet``,
... with columns ``image`` (encoded bytes), ``label`` (int16 index into the sorted class
folder names) and ``path`` (the source file relative to SRC); the schema metadata holds
``classes`` (a JSON list) and ``format``.

Resumable and never torn: the sorted file list is shuffled with a fixed seed and cut into
shards of about ``shard_mb`` MiB of encoded bytes, in order. Each shard is written whole
(local: a temporary name, then a rename; object stores: one upload, which the store
shows only once it is complete) and only
then recorded in ``_convert_manifest.json`` (rewritten atomically), which also holds the
source listing's fingerprint and the options. A re-run starts after the last recorded
shard; encoding is deterministic, so a shard written but not yet recorded is rewritten
with the same rows. A re-run with other options or a changed source is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.convert_images import ProgressBar, cover_and_crop, decode_with_pil, encode, short_error, with_channels
from trainers.configtools import ConfigError, json_record, shown, user_path
from trainers.data import IMAGE_SUFFIXES, DataError, decode_image
from trainers.uris import file_info as _info
from trainers.uris import open_location

FORMATS = ("jpeg", "png", "keep")
MANIFEST, SUCCESS, BAD_FILES = "_convert_manifest.json", "_SUCCESS", "_bad_files.csv"
MANIFEST_VERSION = 1
SHUFFLE_SEED = 0  # fixed: the shard contents must not change between a run and its resume


@dataclass(frozen=True)
class ConvertConfig:
    """What ``raysweep data convert`` was asked to do; validated when built."""

    src: str
    dst: str
    shard_mb: float = 128.0
    image_size: tuple[int, int] | None = None  # (H, W): cover H x W, then center-crop to it
    format: str = "jpeg"
    quality: int = 90  # JPEG quality, 1..100
    channels: int = 3  # re-encoded images: 3 (RGB; grey expanded, alpha dropped) or 1 (grey)
    threads: int = 0  # 0 = one per core, at least 2 (reads from object stores wait on the network)

    def __post_init__(self):
        problems = []
        if not 0 < self.shard_mb <= 64 * 1024:
            problems.append(f"shard_mb: {self.shard_mb} must be > 0 and at most 65536 (MiB of encoded images per "
                            "shard, e.g. 128)")
        if self.image_size is not None and (len(self.image_size) != 2 or not all(1 <= v <= 4096
                                                                                 for v in self.image_size)):
            problems.append(f"image_size: {shown(self.image_size)} must be two whole numbers H W in 1..4096, "
                            "e.g. 224 224")
        if self.format not in FORMATS:
            problems.append(f"format: {self.format!r} is not one of {list(FORMATS)}")
        if self.format == "keep" and self.image_size is not None:
            problems.append("format: 'keep' copies the original bytes and cannot resize; "
                            "use --format jpeg or png with --image-size")
        if self.channels not in (1, 3):
            problems.append(f"channels: {self.channels} must be 3 (RGB) or 1 (grey)")
        if not 1 <= self.quality <= 100:
            problems.append(f"quality: {self.quality} must be in 1..100 (JPEG quality, e.g. 90)")
        if self.threads < 0:
            problems.append(f"threads: {self.threads} must be >= 0 (0 = one per core)")
        if _norm(self.src) == _norm(self.dst) or _norm(self.dst).startswith(_norm(self.src) + "/"):
            problems.append(f"dst: {self.dst!r} lies inside src {self.src!r}; it would be read as a class folder. "
                            "Choose a destination outside the source")
        if problems:
            raise ConfigError(problems)

    def options(self) -> dict:
        """What decides the shards' contents; a resume must ask for exactly these."""
        return {"shard_mb": self.shard_mb, "image_size": list(self.image_size) if self.image_size else None,
                "format": self.format, "quality": self.quality if self.format == "jpeg" else None,
                "channels": None if self.format == "keep" else self.channels,
                "shuffle_seed": SHUFFLE_SEED}


def _norm(location: str) -> str:
    return location.rstrip("/") if "://" in location else str(user_path(location, "data convert").resolve())


# -- filesystems ------------------------------------------------------------------------


# -- the source listing -----------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    relative: str  # "<class>/<name>", '/'-separated
    label: int
    size: int


@dataclass
class Listing:
    classes: list[str]
    files: list[SourceFile]  # sorted by path
    ignored: int  # files with an unsupported extension, or not directly inside a class folder
    fingerprint: str  # changes when any file is added, removed, resized or touched


def list_source(fs: pafs.FileSystem, root: str, location: str) -> Listing:
    info = _info(fs, root, location, "SRC")
    if info.type != pafs.FileType.Directory:
        raise DataError(f"SRC {location!r}: no such directory")
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise DataError(f"SRC {location!r}: cannot list ({e})") from None
    prefix = root.rstrip("/") + "/"
    dirs, files = [], []
    for e in entries:
        rel = e.path[len(prefix):] if e.path.startswith(prefix) else e.path
        if e.type == pafs.FileType.Directory and "/" not in rel and not rel.startswith("."):
            dirs.append(rel)  # hidden folders (.ipynb_checkpoints, ...) are not classes
        elif e.type == pafs.FileType.File:
            files.append((rel, e.size, e.mtime_ns))
    classes = sorted(dirs)
    if not classes:
        raise DataError(f"SRC {location!r}: no class folders; expected SRC/<class>/*.jpg|png")
    label_of = {c: i for i, c in enumerate(classes)}
    kept, ignored, digest = [], 0, hashlib.sha256()
    for rel, size, mtime_ns in sorted(files):
        cls, _, name = rel.partition("/")
        if cls not in label_of or "/" in name or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            ignored += 1
            continue
        kept.append(SourceFile(rel, label_of[cls], size))
        digest.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    if not kept:
        raise DataError(f"SRC {location!r}: the class folders {classes[:5]} hold no image files "
                        f"({', '.join(IMAGE_SUFFIXES)}); {ignored} other files were ignored")
    return Listing(classes, kept, ignored, digest.hexdigest())


def shuffled(files: list[SourceFile]) -> list[SourceFile]:
    """A fixed-seed shuffle of the sorted list, so that every shard mixes the classes."""
    order = list(files)
    random.Random(SHUFFLE_SEED).shuffle(order)
    return order


# -- one image ----------------------------------------------------------------------------


@dataclass
class Converted:
    source: SourceFile
    data: bytes | None  # None when the file was bad
    error: str | None = None


def convert_one(fs: pafs.FileSystem, root: str, source: SourceFile, cfg: ConvertConfig) -> Converted:
    """Read, check and (re-)encode one file; a bad file comes back with its error, never raised."""
    try:
        with fs.open_input_stream(f"{root}/{source.relative}") as f:
            data = f.read()
    except OSError as e:
        return Converted(source, None, f"unreadable: {e}")
    if not data:
        return Converted(source, None, "empty file (0 bytes)")
    try:  # decoded even for --format keep: training must be able to decode every row
        img = decode_image(data, source.relative)
    except DataError as e:
        # torchvision reads jpeg/png/webp/gif only; what it cannot read is kept only if PIL
        # can and the bytes are re-encoded (BMP, TIFF, ...): training decodes with torchvision.
        img = None if cfg.format == "keep" else decode_with_pil(data)
        if img is None:
            return Converted(source, None, short_error(str(e).removeprefix(f"{source.relative}: ")))
    if cfg.format == "keep":
        return Converted(source, data)
    img = with_channels(img, cfg.channels)
    if cfg.image_size:
        img = cover_and_crop(img, *cfg.image_size)
    try:
        return Converted(source, encode(img, cfg.format, cfg.quality))
    except RuntimeError as e:  # e.g. a channel count the encoder refuses
        return Converted(source, None, short_error(f"cannot encode as {cfg.format}: {e}"))


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.map`` in order, but with at most ``window`` items in flight (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -- DST: manifest and shards -------------------------------------------------------------


class Destination:
    """Whole-file writes under DST: a temporary name and a rename where renames are atomic
    (local disk); a direct write on object stores, where rename is copy + delete but an
    upload (PUT or multipart) becomes visible only when it completes."""

    def __init__(self, location: str):
        self.location = location
        self.fs, self.root = open_location(location, "DST")
        self.atomic_rename = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self) -> None:
        info = _info(self.fs, self.root, self.location, "DST")
        if info.type == pafs.FileType.File:
            raise DataError(f"DST {self.location!r} is a file; give a directory or a URI prefix")
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as e:
            raise DataError(f"DST {self.location!r}: not writable ({e})") from None
        if self.atomic_rename:  # temporaries of a run killed mid-write (see write())
            for e in self.fs.get_file_info(pafs.FileSelector(self.root)):
                if e.base_name.startswith((".part-", "._")) and e.base_name.endswith(".tmp"):
                    self.fs.delete_file(e.path)

    def names(self) -> list[str]:
        return sorted(e.base_name for e in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)))

    def write(self, name: str, write: Callable[[str], None]) -> None:
        if not self.atomic_rename:
            write(self.path(name))
            return
        tmp = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
        write(tmp)
        self.fs.move(tmp, self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        def put(path):
            with self.fs.open_output_stream(path) as f:
                f.write(data)

        self.write(name, put)

    def read_json(self, name: str):
        if self.fs.get_file_info(self.path(name)).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(name)) as f:
            return json_record(f.read().decode(), self.path(name))

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1) + "\n").encode())


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_table(rows: list[Converted], classes: list[str], fmt: str) -> pa.Table:
    label_type = pa.int16() if len(classes) <= 2**15 else pa.int32()
    table = pa.table({
        "image": pa.array([r.data for r in rows], pa.binary()),
        "label": pa.array([r.source.label for r in rows], label_type),
        "path": pa.array([r.source.relative for r in rows], pa.string()),
    })
    return table.replace_schema_metadata({"classes": json.dumps(classes), "format": fmt})


def start_manifest(dst: Destination, cfg: ConvertConfig, listing: Listing) -> dict:
    """The manifest to continue from: a fresh one, or the one a matching earlier run left."""
    fresh = {"version": MANIFEST_VERSION, "src": cfg.src, "fingerprint": listing.fingerprint,
             "options": cfg.options(), "classes": listing.classes, "files": len(listing.files),
             "shards": [], "complete": False}
    old = dst.read_json(MANIFEST)
    if old is None:
        stray = [n for n in dst.names() if n.endswith(".parquet") or n == SUCCESS]
        if stray:
            raise DataError(f"DST {dst.location!r} already holds {stray[:3]} but no {MANIFEST}; "
                            "refusing to mix shards: choose an empty destination")
        dst.write_json(MANIFEST, fresh)  # before any shard, so every shard has a manifest
        return fresh
    if old.get("version") != MANIFEST_VERSION or old.get("fingerprint") != fresh["fingerprint"] or \
            old.get("options") != fresh["options"] or old.get("classes") != fresh["classes"]:
        raise DataError(f"DST {dst.location!r} holds a conversion with other inputs ({_differences(old, fresh)}). "
                        "Re-run with the same SRC and options to resume it, or choose an empty destination")
    return old


def _differences(old: dict, new: dict) -> str:
    found = [f"--{k.replace('_', '-')}: was {old['options'].get(k)!r}, now {v!r}"
             for k, v in new["options"].items() if (old.get("options") or {}).get(k) != v]
    if old.get("fingerprint") != new["fingerprint"] or old.get("classes") != new["classes"]:
        found.insert(0, "the source files changed since that run")
    return "; ".join(found) or f"a manifest of version {old.get('version')}, not {MANIFEST_VERSION}"


# -- the whole conversion -------------------------------------------------------------------


def convert(cfg: ConvertConfig, stop_after_shards: int | None = None, progress: bool = True) -> dict:
    """Convert ``cfg.src`` into shards under ``cfg.dst``; returns the summary (also written
    to ``DST/_SUCCESS``). ``stop_after_shards`` stops after writing that many shards in
    this call, as a kill would (for tests and drills); the summary then has ``complete: False``."""
    src_fs, src_root = open_location(cfg.src, "SRC")
    listing = list_source(src_fs, src_root, cfg.src)
    dst = Destination(cfg.dst)
    dst.prepare()
    manifest = start_manifest(dst, cfg, listing)
    if not manifest["complete"]:
        _write_shards(cfg, src_fs, src_root, listing, dst, manifest, stop_after_shards, progress)
    if not manifest["complete"]:
        return {"complete": False, "shards": len(manifest["shards"])}
    return _finish(dst, manifest, listing)


def _write_shards(cfg, src_fs, src_root, listing, dst, manifest, stop_after_shards, progress) -> None:
    order = shuffled(listing.files)
    done = manifest["shards"][-1]["end"] if manifest["shards"] else 0
    shard_bytes = cfg.shard_mb * 2**20
    fmt = "original" if cfg.format == "keep" else cfg.format
    threads = cfg.threads or max(2, os.cpu_count() or 1)
    bar = ProgressBar(len(order), done, len(manifest["shards"]), progress)
    written_now, rows, bad, size, first = 0, [], [], 0, done

    def flush(end: int) -> None:
        nonlocal rows, bad, size, first, written_now
        name = shard_name(sum(1 for s in manifest["shards"] if s["name"]))
        if rows:  # a stretch of only bad files writes no shard, but is still recorded as done
            table = shard_table(rows, listing.classes, fmt)
            dst.write(name, lambda path: pq.write_table(table, path, filesystem=dst.fs,
                                                        compression={"image": "none", "label": "snappy", "path": "snappy"},
                                                        use_dictionary=["label"]))
        manifest["shards"].append({"name": name if rows else None, "first": first, "end": end, "rows": len(rows),
                                   "bytes": size, "bad": bad})
        dst.write_json(MANIFEST, manifest)  # after the shard: a recorded shard is always whole
        written_now += 1
        bar.shard_done(sum(1 for s in manifest["shards"] if s["name"]))
        rows, bad, size, first = [], [], 0, end

    with ThreadPoolExecutor(threads) as pool:
        results = ordered_map(pool, lambda s: convert_one(src_fs, src_root, s, cfg), order[done:], 4 * threads)
        for position, result in enumerate(results, start=done + 1):
            if result.data is None:
                bad.append([result.source.relative, result.error])
            else:
                rows.append(result)
                size += len(result.data)
            bar.file_done()
            if size >= shard_bytes or position == len(order):
                flush(position)
                if stop_after_shards is not None and written_now >= stop_after_shards and position < len(order):
                    results.close()  # drops the read-ahead; the rest is left for a resume
                    bar.close()
                    return
    manifest["complete"] = True
    dst.write_json(MANIFEST, manifest)
    bar.close()


def _finish(dst: Destination, manifest: dict, listing: Listing) -> dict:
    bad = [row for s in manifest["shards"] for row in s["bad"]]
    _write_bad_files(dst, bad)
    shards = [s for s in manifest["shards"] if s["name"]]
    summary = {"complete": True, "dst": dst.location, "images": sum(s["rows"] for s in shards),
               "shards": len(shards), "mib": round(sum(s["bytes"] for s in shards) / 2**20, 3),
               "classes": manifest["classes"], "bad_files": len(bad), "ignored_files": listing.ignored,
               "options": manifest["options"]}
    dst.write_json(SUCCESS, summary)
    return summary


def _write_bad_files(dst: Destination, bad: list[list[str]]) -> None:
    """CSV, not Parquet: the parquet reader globs ``*.parquet`` in DST and would read it as shards."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "error"])
    writer.writerows(bad)
    dst.write_bytes(BAD_FILES, out.getvalue().encode())


def summary_line(summary: dict) -> str:
    return (f"converted {summary['images']} images of {len(summary['classes'])} classes into "
            f"{summary['shards']} shards ({summary['mib']} MiB) under {summary['dst']}; "
            f"{summary['bad_files']} bad files (listed in {BAD_FILES}), "
            f"{summary['ignored_files']} ignored (unsupported extension or not in a class folder)")
