"""What `raysweep predict` reads, planned on the driver before any Ray process starts: the
checkpoint (``--checkpoint``) and the inputs (``--data``), with every refusal here.

The files themselves are read and decoded later, in Ray Data, by the readers training
uses (``trainers.streaming``): image folders and Parquet, local or any pyarrow.fs URI.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.checkpoints import STATE_FILE, load_state, network_from_state
from trainers.configtools import json_record, reading, record_text, user_path
from trainers.data import DATASETS, IMAGE_SUFFIXES, DataError, decode_classes, load_data
from trainers.inference import InferenceError, check_state
from trainers.predict_readers import NO_LABEL, SKIP_LABEL, list_images, row_groups
from trainers.streaming import list_parquet
from trainers.uris import as_uri, open_parquet

# --unknown-classes: what becomes of inputs labelled with a class the model does not know
# (a stray class folder, a Parquet file's extra class). The default predicts them without
# a label: every input still gets its row, and the metrics cover the classes the model knows.
UNKNOWN_CLASSES = ("unlabelled", "skip", "error")


# -- which checkpoint -------------------------------------------------------------------


def resolve_checkpoint(spec: str) -> tuple[str, str]:
    """``--checkpoint`` -> (checkpoint directory or state.pt, how it was found).

    A checkpoint directory or ``state.pt``; a train run (``summary.json``'s ``checkpoint``,
    its best); a tune experiment (``best.json``'s ``checkpoint``, the best trial's). Local
    paths or pyarrow.fs URIs.
    """
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(spec) if "://" in spec else (
        pafs.LocalFileSystem(), str(user_path(spec, "--checkpoint").resolve()))
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
        with reading(f"{path}/{name}", "--checkpoint"), fs.open_input_stream(f"{path}/{name}") as f:
            record = json_record(f.read(), f"{path}/{name}")
        ckpt = record_text(record, "checkpoint", f"{path}/{name}")
        if not ckpt and (reason := record_text(record, "no_checkpoint_reason", f"{path}/{name}")):
            raise InferenceError(f"--checkpoint {spec!r}: {reason}")  # e.g. a --cv search (cluster.tune_cv)
        if not ckpt:
            raise InferenceError(
                f"--checkpoint {spec!r}: {name} has no 'checkpoint' (status {record.get('status', '?')!r}); "
                "the run saved no usable checkpoint: point --checkpoint at a checkpoint_*/ directory instead")
        if "://" not in ckpt and not os.path.isabs(ckpt) and "://" not in spec:
            ckpt = str(Path(path) / ckpt)  # relative to the experiment directory
        return as_uri(spec, ckpt), what
    if fs.get_file_info(f"{path}/fold-1/{STATE_FILE}").type == pafs.FileType.File:  # search_spaces.cv_trial
        raise InferenceError(f"--checkpoint {spec!r}: a --cv trial's checkpoint holds its fold models (to resume "
                             "it), no single model; train the search's best_config.yaml with raysweep train --cv K "
                             "--cv-refit")
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
    network_from_state(state)  # the weights fit the model the meta describes: known here, not in an actor
    return {"model": state["model"], "meta": state["meta"]}, where, how


# -- inputs -----------------------------------------------------------------------------


@dataclass
class Inputs:
    """What to predict: ``kind`` files (items ``id``, ``label``), parquet (row-group items
    and each file's label map) or memory (items ``id``, ``label``, ``image``)."""

    kind: str
    items: list[dict]
    count: int  # rows the output will have
    labelled: int  # of them, inputs with a label the model knows
    describe: str
    notes: list[str] = field(default_factory=list)
    label_maps: dict = field(default_factory=dict)  # parquet: file -> [model class index per file label]


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    name, _, path = spec.partition(":")
    known = DATASETS.names()
    if name not in known:
        raise DataError(f"--data {spec!r}: unknown data set {name!r}; known: {', '.join(known)} (NAME[:PATH])")
    return name, path or None


def plan_inputs(spec: str, meta: dict, data_cfg, unknown: str = "unlabelled") -> Inputs:
    name, path = parse_data_spec(spec)
    classes = [str(c) for c in meta["classes"]]
    planner = {"imagefolder": _folder_inputs, "parquet": _parquet_inputs}.get(name) if path else None
    if planner:
        return planner(path, classes, spec, unknown)
    return _memory_inputs(name, path, classes, data_cfg, spec, unknown)


def _unknown(names: list[str], classes: list[str], unknown: str, what: str, spec: str) -> str | None:
    """Refuses (``error``) or describes what happens to inputs of classes the model lacks."""
    if not names:
        return None
    if unknown == "error":
        raise DataError(f"--data {spec!r}: {what} {names} are not classes of the model {classes}; "
                        "rename them, or pass --unknown-classes unlabelled|skip")
    done = "skipped (no rows)" if unknown == "skip" else "predicted without a label"
    return f"{what} {names} are not classes of the model: their images are {done} (--unknown-classes {unknown})"


def _folder_inputs(root: str, classes: list[str], spec: str, unknown: str) -> Inputs:
    """``root/<class>/...`` (labelled by folder name) and/or ``root/*.png`` (unlabelled)."""
    listing = list_images(root, "--data")
    index = {c: i for i, c in enumerate(classes)}
    strays = sorted({d for d in listing.folders if d and d not in index})
    notes = [n for n in [_unknown(strays, classes, unknown, "class folder(s)", spec)] if n]
    items = []
    for f, folder in zip(listing.files, listing.folders):
        label = index.get(folder, SKIP_LABEL if unknown == "skip" else NO_LABEL) if folder else NO_LABEL
        if label != SKIP_LABEL:
            items.append({"id": f, "label": label})
    if not items:
        raise DataError(f"--data {spec!r}: no {'/'.join(IMAGE_SUFFIXES)} files to predict in {root!r} or its class folders")
    if listing.others:
        notes.append(f"ignored {listing.others} file(s) without an image suffix")
    labelled = sum(i["label"] != NO_LABEL for i in items)
    return Inputs("files", items, len(items), labelled, f"imagefolder {root}", notes)


def _parquet_inputs(root: str, classes: list[str], spec: str, unknown: str) -> Inputs:
    """Parquet file(s) with an encoded ``image`` column, ``label`` optional (``_parquet_labels``)."""
    try:
        files = [as_uri(root, f) for f in list_parquet(root).files]
    except DataError:
        raise DataError(f"--data {spec!r}: no Parquet file at {root!r}") from None
    label_maps, count, labelled, strays = {}, 0, 0, set()
    for f in files:
        try:
            pfile = open_parquet(f)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"--data {spec!r}: {f} is not a readable Parquet file ({e})") from None
        names = pfile.schema_arrow.names
        if "image" not in names:
            raise DataError(f"--data {spec!r}: {f} has no 'image' column (found {names}); it needs encoded images there")
        rows = pfile.metadata.num_rows
        if "label" in names:
            label_maps[f], known, skipped, found = _parquet_labels(f, pfile, classes, unknown, spec)
            labelled, rows, strays = labelled + known, rows - skipped, strays | found
        count += rows
    notes = [n for n in [_unknown(sorted(strays), classes, unknown, "label class(es)", spec)] if n]
    return Inputs("parquet", row_groups(files), count, labelled, f"parquet {root}", notes, label_maps)


def _parquet_labels(f: str, pfile, classes: list[str], unknown: str, spec: str):
    """One file's (label map: file label -> model class index, labelled rows, skipped rows,
    names of classes the model lacks). A file names its classes in its ``classes`` metadata;
    without it, its labels index the model's classes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_integer(kind := pfile.schema_arrow.field("label").type):
        raise DataError(f"--data {spec!r}: {f}: the 'label' column is {kind}; labels are whole numbers (class "
                        "indices)")
    valid = pc.drop_null(pfile.read(columns=["label"]).column("label")).to_numpy()
    metadata = pfile.schema_arrow.metadata or {}
    top = int(valid.max(initial=-1)) + 1
    names = decode_classes(metadata[b"classes"].decode()) if b"classes" in metadata else [
        classes[i] if i < len(classes) else f"label {i}" for i in range(top)]
    if len(valid) and (valid.min() < 0 or top > len(names)):
        bad = int(valid[(valid < 0) | (valid >= len(names))][0])
        raise DataError(f"--data {spec!r}: {f} has labels outside 0..{len(names) - 1} (e.g. {bad}); "
                        f"labels index the classes {names}")
    index = {c: i for i, c in enumerate(classes)}
    label_map = [index.get(c, SKIP_LABEL if unknown == "skip" else NO_LABEL) for c in names]
    mapped = np.asarray(label_map, dtype=np.int64)[valid] if len(valid) else np.zeros(0, np.int64)
    strays = {names[i] for i in np.unique(valid) if names[i] not in index}
    return label_map, int((mapped >= 0).sum()), int((mapped == SKIP_LABEL).sum()), strays


def _memory_inputs(name: str, path: str | None, classes: list[str], data_cfg, spec: str, unknown: str) -> Inputs:
    """A registered data set's test split, exactly as training split it (the checkpoint's
    data config); its images are brought to the model's shape later (``conform_rows``)."""
    cfg = data_cfg if name == data_cfg.name else type(data_cfg)(name=name, seed=data_cfg.seed)
    if path:
        cfg = dataclasses.replace(cfg, root=path)
    data = load_data(cfg)
    names = [str(c) for c in data.classes]
    notes = []
    labels = data.test.y.numpy()
    if names != classes:
        strays = [n for n in names if n not in classes and (labels == names.index(n)).any()]
        if note := _unknown(strays, classes, unknown, "the data set's class(es)", spec):
            notes.append(note)
        missing = SKIP_LABEL if unknown == "skip" else NO_LABEL
        labels = np.array([classes.index(n) if n in classes else missing for n in names])[labels]
        notes.append(f"the data set's classes {names} differ from the model's; labels mapped by name")
    x = data.test.x.numpy()
    items = [{"id": f"{name}:test:{i}", "label": int(labels[i]), "image": x[i]}
             for i in range(len(x)) if labels[i] != SKIP_LABEL]
    if not items:
        raise DataError(f"--data {spec!r}: no inputs left to predict (--unknown-classes skip dropped them all)")
    return Inputs("memory", items, len(items), sum(i["label"] != NO_LABEL for i in items),
                  f"{name} test split ({'data.root=' + path if path else 'the checkpoint data config'})", notes)
