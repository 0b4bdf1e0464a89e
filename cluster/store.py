"""The results store: Arrow tables, JSON and pictures under ``<storage>/<name>/``.

``storage`` is a local directory or any ``pyarrow.fs`` URI (``s3://bucket/prefix``,
``gs://…``, ``file:///…``). Every write goes to a temporary name first and is then
renamed, so a crash at any moment leaves each file either old or new, never half written.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainers.configtools import json_record, reading, user_path
from trainers.uris import open_location


def resolve_storage(storage: str) -> str:
    """Local paths become absolute (Ray needs that); URIs pass through."""
    if "://" in storage:
        return storage
    return str(user_path(storage, "--storage").resolve())


class ResultsStore:
    """Atomic reads and writes under one experiment directory."""

    def __init__(self, storage: str, name: str, role: str = "--storage"):
        self.storage, self.name = resolve_storage(storage), name
        # open_location: an unknown scheme is a DataError naming ``role``, and S3 gives up
        # on an unreachable endpoint in seconds, not minutes.
        self.fs, root = open_location(self.storage, role) if "://" in self.storage else (pafs.LocalFileSystem(), self.storage)
        self.root = f"{root.rstrip('/')}/{name}"
        self._dir_made = False

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def local_path(self, relative: str) -> str | None:
        """A path open() can read, for local storage; None for remote storage."""
        return self.path(relative) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def _atomic(self, relative: str, write) -> None:
        if not self._dir_made:  # readers never create directories
            self.fs.create_dir(self.root, recursive=True)
            self._dir_made = True
        final = self.path(relative)
        tmp = f"{self.root}/.{os.path.basename(relative)}.{uuid.uuid4().hex}.tmp"
        try:
            write(tmp)
            self.fs.move(tmp, final)
        except BaseException:  # a full disk, a lost bucket, Ctrl-C: no half file stays behind
            self._remove_quietly(tmp)
            raise

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:  # never written, or storage gone: the original error is what matters
            pass

    def write_table(self, relative: str, table: pa.Table) -> None:
        self._atomic(relative, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs))

    def write_bytes(self, relative: str, data: bytes) -> None:
        def write(tmp):
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)

        self._atomic(relative, write)

    def write_json(self, relative: str, obj) -> None:
        self.write_bytes(relative, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())

    def exists(self, relative: str) -> bool:
        """Whether ``relative`` is there; a directory where a file belongs is an error."""
        kind = self.fs.get_file_info(self.path(relative)).type
        if kind == pafs.FileType.Directory:
            raise IsADirectoryError(21, "is a directory, not a file", self.path(relative))
        return kind != pafs.FileType.NotFound

    def read_table(self, relative: str) -> pa.Table | None:
        """The table, None when the file is absent; ``FileReadError`` (exit 2) naming the
        file when it cannot be read or is not Parquet."""
        with reading(f"{self.uri}/{relative}"):
            if not self.exists(relative):
                return None
            return pq.read_table(self.path(relative), filesystem=self.fs)

    def read_json(self, relative: str):
        with reading(f"{self.uri}/{relative}"):
            if not self.exists(relative):
                return None
            with self.fs.open_input_stream(self.path(relative)) as f:
                return json_record(f.read().decode(), f"{self.uri}/{relative}")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
