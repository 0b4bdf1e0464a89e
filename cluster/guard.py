"""Where a run lands, checked before Ray starts: ``--name``, ``--storage`` and ``--resume``.

Storage is code. Resuming a search unpickles ``tuner.pkl`` and the searcher's state from
``<storage>/<name>``; a planted ``tuner.pkl`` ran a shell command on the driver. So:

- a run resumes only when asked (``--resume``); re-using a name without it is refused,
  and ``--resume`` of a name that holds nothing is refused too;
- a name is one path component of safe characters, so ``<storage>/<name>`` stays inside
  the storage (``../x``, absolute paths, slashes and newlines are refused);
- local storage (and every directory above it) must not be writable by other users: they
  could plant files in it, or swap the directory for their own. Remote storage
  (``s3://...``) cannot be checked from here; its access policy is the user's to set.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from cluster.store import ResultsStore
from trainers.configtools import ConfigError, shown

NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE_TEXT = ("one path component: a letter or digit, then up to 127 letters, digits, '.', '_' or '-' "
                  "(no '/', no '..')")
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def check_name(name: str, option: str = "--name") -> str:
    """``name`` if it is a safe run name, else ``ConfigError`` naming the option, value and rule."""
    if not NAME_RULE.fullmatch(name) or name in (".", ".."):
        raise ConfigError([f"{option}: {shown(name)} is not a valid run name; use {NAME_RULE_TEXT}"])
    return name


def safe_name_part(text: str) -> str:
    """``text`` made fit for a default name (a search space's own ``name:`` can hold anything)."""
    return UNSAFE_NAME_CHARS.sub("_", text)[:60] or "run"


def _problem_with(path: Path, must_be_private: bool) -> str | None:
    """Why ``path`` (an existing directory or file) could be changed by another user, or None.

    ``must_be_private``: no group/other write at all (the storage and the run's own files).
    Otherwise (a directory above them) group/other write is fine with the sticky bit set
    (as on /tmp): others can then add entries but not rename or remove ours."""
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.getuid(), 0):
        return (f"{path} belongs to another user (uid {st.st_uid}), who can change what is in it; "
                "use storage that you own")
    others_write = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if others_write and (must_be_private or not mode & stat.S_ISVTX):
        return f"{path} (mode {mode:04o}) is writable by other users; run `chmod go-w {path}` or use other storage"
    return None


def check_local_storage(store: ResultsStore, resume: bool) -> None:
    """Refuse local storage that other users can write to (see the module's docstring):
    the storage directory (or, if not yet made, the nearest existing directory above it),
    every directory above that, and on ``resume`` the run's directory and its top-level
    files (``tuner.pkl``, the searcher's state), which the resume reads."""
    if not isinstance(store.fs, pafs.LocalFileSystem):
        return
    storage = Path(store.root).parent
    nearest = next(p for p in (storage, *storage.parents) if p.exists())
    checks = [(nearest, nearest == storage)] + [(p, False) for p in nearest.parents]
    run_dir = Path(store.root)
    if resume and run_dir.is_dir():
        checks += [(run_dir, True)] + [(p, True) for p in sorted(run_dir.iterdir()) if not p.is_symlink()]
    problems = [p for path, private in checks if (p := _problem_with(path, private))]
    if problems:
        raise ConfigError([f"--storage: {p}" for p in problems])


def run_exists(store: ResultsStore) -> bool:
    try:
        return store.fs.get_file_info(store.root).type != pafs.FileType.NotFound
    except OSError as e:  # e.g. a bucket that does not exist or refuses us
        raise ConfigError([f"--storage {store.storage}: cannot be read ({e}); check the URI and credentials"]) from None


def check_resume_rule(store: ResultsStore, resume: bool, command: str) -> None:
    """Re-using a name needs ``--resume``; ``--resume`` needs a run to continue."""
    exists = run_exists(store)
    if exists and not resume:
        raise ConfigError([
            f"--name {store.name}: {store.uri} already exists; pass --resume to continue that {command} run "
            "(it loads the run's saved state, so only resume runs from storage you trust), or choose a new --name"])
    if resume and not exists:
        raise ConfigError([f"--resume: nothing to resume at {store.uri}; check --storage and --name, "
                           "or drop --resume to start a new run"])


def make_private_dirs(store: ResultsStore) -> None:
    """Create missing local storage directories without group/other write, one level at a
    time (``os.makedirs`` gives the levels above the last one the umask's mode), so the
    next run does not refuse them."""
    if not isinstance(store.fs, pafs.LocalFileSystem):
        return
    storage = Path(store.root).parent
    for path in reversed([p for p in (storage, *storage.parents) if not p.exists()]):
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:  # made meanwhile, maybe by someone else: checked below
            continue
        except OSError as e:
            raise ConfigError([f"--storage: cannot create {path} ({e.strerror or e}); "
                               "give a directory you can write"]) from None
    if (problem := _problem_with(storage, must_be_private=True)):
        raise ConfigError([f"--storage: {problem}"])


def check_writable(store: ResultsStore) -> None:
    """Write and delete one small file in the storage, so that storage that is a file,
    read-only, or an unreachable, missing or refusing bucket is refused now, not after Ray
    started (where it failed with a traceback)."""
    storage = store.root.rsplit("/", 1)[0]
    probe = f"{storage}/.raysweep-write-check-{uuid.uuid4().hex}"
    try:
        with store.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        store.fs.delete_file(probe)
    except OSError as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:300]
        raise ConfigError([f"--storage {store.storage}: cannot write there ({reason}); give a directory you can "
                           "write, or for s3:// check the bucket, endpoint (AWS_ENDPOINT_URL) and credentials"]) from None


def check_run_target(storage: str, name: str, resume: bool, command: str) -> ResultsStore:
    """All checks of where a run lands, before Ray starts; returns the run's store."""
    check_name(name)
    if "://" in storage and "?" in storage:  # the run's URI is <storage>/<name>: a query would swallow it
        raise ConfigError([f"--storage {shown(storage)}: a URI with options ('?...') cannot take a run name after "
                           "it; set the options in the environment (e.g. AWS_ENDPOINT_URL) and give the bare URI"])
    store = ResultsStore(storage, name)
    local = isinstance(store.fs, pafs.LocalFileSystem)
    if local and any(p.exists() and not p.is_dir() for p in (Path(store.storage), *Path(store.storage).parents)):
        raise ConfigError([f"--storage {store.storage}: a file stands where a directory should; give a directory "
                           "or a URI"])
    check_local_storage(store, resume)
    check_resume_rule(store, resume, command)
    make_private_dirs(store)
    check_writable(store)
    return store
