"""data_scale: does a streamed `raysweep train` keep its memory flat as the data grows, and
what does streaming cost against the in-memory path?

Part 1 (memory): generated mixed-size JPEGs (``min_px``-``max_px`` per side, each side
drawn separately, so aspect ratios vary too) as Parquet shards of ``shard`` images, at
two sizes, N and 10xN, each trained for one epoch, streamed (``data.streaming=true``,
``data.image_size`` resizing on Ray Data's decode tasks). Target: the peak RSS of the
driver and of each training worker at 10xN <= 1.2x that at N (the headline value is the
larger of the two ratios).

Part 2 (throughput): the real CIFAR-10 Parquet (``$RAYSWEEP_CIFAR10`` or
``../shared/data/cifar10``), the same recipe once in memory (``data.streaming=false``) and
once streamed, in the same benchmark run, order alternating when ``rounds`` > 1. Ratio =
streamed / in-memory training images/s of the last epoch (epoch 2 of 2: epoch 1 holds the
data pipeline's start-up). Target >= 0.85. Skipped, ``met: None``, where the set is absent.

Every run is `raysweep train` as a user runs it: ``python -m cluster.cli train ...`` in a
subprocess of its own (its own embedded Ray, its own memory), ``--workers 1
--cpus-per-worker 1`` (on 2 cores: one for the worker, one left for the decode tasks).
images/s is raysweep's own (``history.parquet``). While a run goes, a thread here samples
every process of its tree (the CLI process = the driver, and the Ray it starts: GCS,
raylet, controller, train worker, Ray Data's tasks) from ``/proc`` every ``SAMPLE_S``:
VmRSS (and RssAnon), CPU seconds and process title. See ``ProcessSampler`` for what is
counted where.

The generated sets are cached under ``benchmarks/data_cache/`` (git-ignored) and reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO, Result, median

TARGET_RSS, TARGET_THROUGHPUT = 1.2, 0.85
CACHE = Path(__file__).resolve().parent / "data_cache"
SAMPLE_S = 0.2
RUN_TIMEOUT_S = 3600

SIZES = {
    # n: N images (the large set is 10 x N); shard: images per Parquet file; cifar: the
    # throughput half (None: skipped), subset = first rows of train/test (None: all)
    "full": dict(n=20_000, image_size=64, min_px=48, max_px=96, shard=4000, batch=256,
                 cifar=dict(epochs=2, rounds=2, train=None, test=None)),
    "quick": dict(n=2000, image_size=64, min_px=48, max_px=96, shard=500, batch=256,
                  cifar=dict(epochs=2, rounds=1, train=10_000, test=2000)),
    # smoke: the N run alone (the 10N run is the same code on more data; the smoke test
    # only keeps the script from rotting, and each run is a Ray of its own, ~1 min)
    "smoke": dict(n=200, image_size=32, min_px=24, max_px=48, shard=100, batch=64, cifar=None, sizes=("N",)),
}
SCALE = 10
CLASSES = 10
# The recipe of both halves: the small CNN, flip (+ crop for CIFAR-10) on the device. A
# cheap model asks the most of the stream (fast_cifar ran at ~60 img/s here in fp32 on one
# busy core, which any decode keeps up with, and would make the full run hours long).
SYNTH_OVERRIDES = ["model.name=simple_cnn", "augment.flip=0.5"]
CIFAR_OVERRIDES = ["data.name=parquet", "model.name=simple_cnn", "train.batch_size=512", "augment.flip=0.5",
                   "augment.crop_padding=2"]


# --- data -----------------------------------------------------------------------------------

def generate(directory: Path, n: int, min_px: int, max_px: int, shard: int, seed: int) -> Path:
    """``n`` seeded JPEGs of random height and width in ``[min_px, max_px]`` as Parquet
    shards in the layout ``data.name=parquet`` reads (``image`` binary, ``label`` int16,
    metadata ``classes`` a JSON list). Each class is a smooth random colour pattern (as in
    ``trainers.data``'s synthetic set) drawn at the image's size, with random contrast and
    noise: learnable, though accuracy is not the point here. Written to a temporary folder
    and renamed, so an interrupted run leaves no half set in the cache."""
    import torch

    if (directory / "_COMPLETE").is_file():
        return directory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-image tensors are tiny: threads only add overhead
    try:
        _generate(directory, n, min_px, max_px, shard, seed)
    finally:
        torch.set_num_threads(threads)
    return directory


def _generate(directory: Path, n: int, min_px: int, max_px: int, shard: int, seed: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torchvision.io import encode_jpeg

    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(CLASSES, 3, 5, 5, generator=gen)
    meta = {"classes": json.dumps([f"class_{i}" for i in range(CLASSES)]), "format": "jpeg",
            "source": f"benchmarks.data_scale.generate(n={n}, px={min_px}-{max_px}, seed={seed})"}
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    sides = torch.randint(min_px, max_px + 1, (n, 2), generator=gen)
    contrast = 0.4 + 0.5 * torch.rand(n, generator=gen)
    for part, start in enumerate(range(0, n, shard)):
        blobs = []
        for i in range(start, min(n, start + shard)):
            h, w = int(sides[i, 0]), int(sides[i, 1])
            img = torch.nn.functional.interpolate(coarse[labels[i]][None], size=(h, w), mode="bilinear",
                                                  align_corners=False)[0]
            img = 0.5 + (img - 0.5) * contrast[i] + 0.25 * torch.randn(img.shape, generator=gen)
            blobs.append(encode_jpeg((img.clamp(0, 1) * 255).round().to(torch.uint8), quality=90).numpy().tobytes())
        table = pa.table({"image": pa.array(blobs, pa.binary()),
                          "label": pa.array(labels[start:start + len(blobs)].numpy().astype(np.int16))})
        pq.write_table(table.replace_schema_metadata(meta), tmp / f"part-{part:05d}.parquet")
    (tmp / "_COMPLETE").write_text(f"{n}\n")  # names starting with "_" are skipped by the reader
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def synthetic_set(n: int, size: dict) -> tuple[Path, float]:
    """The cached generated set of ``n`` images; seconds spent generating (0 if cached)."""
    directory = CACHE / f"mixed-{size['min_px']}-{size['max_px']}px-{n}-shard{size['shard']}"
    start = time.perf_counter()
    cached = (directory / "_COMPLETE").is_file()
    generate(directory, n, size["min_px"], size["max_px"], size["shard"], seed=n)
    return directory, 0.0 if cached else time.perf_counter() - start


def cifar_root() -> Path:
    return Path(os.environ.get("RAYSWEEP_CIFAR10") or REPO.parent / "shared" / "data" / "cifar10")


def cifar_subset(root: Path, n_train: int | None, n_test: int | None) -> Path:
    """``root`` itself, or a cached copy of its first rows (they are in a seeded random order)."""
    import pyarrow.parquet as pq

    if n_train is None and n_test is None:
        return root
    directory = CACHE / f"cifar10-first-{n_train}-{n_test}"
    if not (directory / "_COMPLETE").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", n_train), ("test", n_test)):
            table = pq.read_table(root / f"{name}.parquet")
            pq.write_table(table.slice(0, n) if n else table, directory / f"{name}.parquet")
        (directory / "_COMPLETE").write_text("ok\n")
    return directory


# --- watching a run's processes ----------------------------------------------------------------

DATA_TITLES = ("MapBatches", "decode_batch")  # raysweep's decode (fused with the read where Ray Data fuses)
# Ray Data 2.60's Parquet reading runs as tasks of their own: listing, footers, reading rows.
READ_TITLES = ("ReadParquet", "ReadFiles", "ListFiles", "FooterRead")
# Ray Data's actors beside the tasks: its executors for Train's shards, its statistics.
DATA_HELPERS = ("SplitCoordinator", "DatasetManager", "_StatsActor", "ActorLocationTracker", "AutoscalingCoordinator")


def kind_of(pid: int, root: int, title: str, comm: str) -> str:
    """What a process of the run is, by its title (Ray names a worker process after the
    task or actor it runs: ``ray::RayTrainWorker...``, ``ray::ReadParquet->MapBatches(
    decode_batch)``, ``ray::SplitCoordinator``, ``ray::IDLE``) or its command name."""
    if pid == root:
        return "driver"
    if "RayTrainWorker" in title:
        return "train_worker"
    if any(t in title for t in DATA_TITLES):
        return "data_task"
    if any(t in title for t in READ_TITLES):
        return "data_read"
    if "Controller" in title:  # Ray Train's TrainController (raysweep's AdaptivePollController)
        return "controller"
    if any(t in title for t in DATA_HELPERS):
        return "data_coordinator"
    if "_evaluate_checkpoint" in title:
        return "test_eval_task"
    if comm == "raylet":
        return "raylet"
    if comm.startswith("gcs_server"):
        return "gcs"
    if title.startswith("ray::"):
        return "ray_worker_other"  # idle pooled workers, other actors
    return "ray_system"  # log monitor, agents, and Ray workers still starting (not yet titled)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _status_kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


@dataclass
class ProcessSampler:
    """Samples a process tree every ``interval_s`` from a thread: per process its kind,
    CPU seconds (user + system), VmRSS and RssAnon (KiB). VmRSS counts the pages of Ray's
    shared-memory object store that a process has mapped and touched; RssAnon does not.
    Also notes when each epoch ended (``progress.json``'s ``updated_at``, written by the
    run's history callback after each report)."""

    root: int
    progress: Path
    interval_s: float = SAMPLE_S
    samples: list = field(default_factory=list)  # [(t, {pid: (kind, cpu_s, rss_kib, anon_kib)})]
    epoch_end: dict = field(default_factory=dict)  # epoch -> time.time() of its report
    seen_kinds: dict = field(default_factory=dict)  # pid -> set of kinds it had
    titles: dict = field(default_factory=dict)  # kind -> titles (Ray's) or command names seen

    def __post_init__(self):
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _tree(self) -> dict[int, tuple[int, str, float]]:
        """``{pid: (ppid, comm, cpu_s)}`` of ``root`` and its descendants."""
        procs = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            stat = _read(f"/proc/{name}/stat")
            if not stat:
                continue
            comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            procs[int(name)] = (int(rest[1]), comm, (int(rest[11]) + int(rest[12])) / self._tick)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = {self.root} if self.root in procs else set(), [self.root]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in tree:
                    tree.add(child)
                    todo.append(child)
        return {pid: procs[pid] for pid in tree}

    def sample(self) -> None:
        t = time.time()
        snap = {}
        for pid, (_, comm, cpu) in self._tree().items():
            status, cmdline = _read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/cmdline")
            if status is None or cmdline is None:
                continue  # gone
            title = cmdline.replace("\0", " ").strip()
            kind = kind_of(pid, self.root, title, comm)
            self.seen_kinds.setdefault(pid, set()).add(kind)
            self.titles.setdefault(kind, set()).add(title[:60] if title.startswith("ray::") else comm)
            snap[pid] = (kind, cpu, _status_kib(status, "VmRSS:"), _status_kib(status, "RssAnon:"))
        self.samples.append((t, snap))
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            p = json.loads(self.progress.read_text())
            self.epoch_end.setdefault(int(p["epoch"]), float(p["updated_at"]))

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
        self.sample()

    # --- summaries ---

    def peaks(self) -> dict:
        """Per kind: the largest VmRSS / RssAnon of one process of that kind (MiB), and
        the largest sum over all the run's processes at one instant ("all")."""
        out: dict[str, dict] = {}
        for _, snap in self.samples:
            for kind, _, rss, anon in snap.values():
                k = out.setdefault(kind, {"rss_mib": 0.0, "anon_mib": 0.0})
                k["rss_mib"] = max(k["rss_mib"], rss / 1024)
                k["anon_mib"] = max(k["anon_mib"], anon / 1024)
            total = out.setdefault("all (sum)", {"rss_mib": 0.0, "anon_mib": 0.0})
            total["rss_mib"] = max(total["rss_mib"], sum(v[2] for v in snap.values()) / 1024)
            total["anon_mib"] = max(total["anon_mib"], sum(v[3] for v in snap.values()) / 1024)
        return {k: {m: round(v, 1) for m, v in d.items()} for k, d in sorted(out.items())}

    def per_worker_peaks(self) -> dict[int, float]:
        """Peak VmRSS (MiB) of each training worker process."""
        out: dict[int, float] = {}
        for _, snap in self.samples:
            for pid, (kind, _, rss, _) in snap.items():
                if kind == "train_worker":
                    out[pid] = max(out.get(pid, 0.0), rss / 1024)
        return {pid: round(v, 1) for pid, v in out.items()}

    def cpu(self, start: float, end: float) -> dict:
        """CPU seconds per kind between the samples nearest ``start`` and ``end``. Each
        interval's CPU goes to the process's kind at the interval's end, except that a
        process running a Ray Data task at either end counts as ``data_task`` (a pooled
        worker shows ``ray::IDLE`` between tasks). A process first seen inside the window
        counts all its CPU (it started there)."""
        window = [(t, s) for t, s in self.samples if start - self.interval_s / 2 <= t <= end + self.interval_s / 2]
        by_kind: dict[str, float] = {}
        for (_, before), (_, after) in zip(window, window[1:]):
            for pid, (kind, cpu, _, _) in after.items():
                prev = before.get(pid)
                used = cpu - prev[1] if prev else cpu
                if prev and prev[0] in ("data_task", "data_read") and kind not in ("data_task", "data_read"):
                    kind = prev[0]
                by_kind[kind] = by_kind.get(kind, 0.0) + max(0.0, used)
        seconds = window[-1][0] - window[0][0] if len(window) > 1 else 0.0
        return {"seconds": round(seconds, 2), "cpu_s": {k: round(v, 2) for k, v in sorted(by_kind.items())},
                "total_cpu_s": round(sum(by_kind.values()), 2)}


# --- one `raysweep train` ----------------------------------------------------------------------

def cli_main(argv: list[str]) -> int:
    """`raysweep` (``cluster.cli.main``), letting Ray's dashboard agent take any free port
    when another local Ray on this machine holds its fixed one (``common._free_agent_port``)."""
    from benchmarks.common import _free_agent_port
    from cluster.cli import main

    with _free_agent_port():
        return main(argv)


def train_run(label: str, overrides: list[str], workdir: Path, config: Path | None = None) -> dict:
    """One ``raysweep train`` in a subprocess, watched; its history, peaks and CPU."""
    import pyarrow.parquet as pq

    storage, name = workdir / "runs", label
    argv = ["train", "--workers", "1", "--cpus-per-worker", "1", "--storage", str(storage), "--name", name]
    argv += ["--config", str(config)] if config else []
    for o in overrides:
        argv += ["--set", o]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p])}
    log = workdir / f"{label}.log"
    code = "import sys; from benchmarks.data_scale import cli_main; sys.exit(cli_main(sys.argv[1:]))"
    t0 = time.time()
    with open(log, "w") as out:
        # A session of its own: if this benchmark is interrupted or the run hangs, its whole
        # group (the CLI and the Ray it started) is ended, not just the CLI process.
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        with ProcessSampler(proc.pid, storage / name / "progress.json") as sampler:
            try:
                rc = proc.wait(timeout=RUN_TIMEOUT_S)
            except BaseException:  # the timeout, Ctrl-C
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"raysweep train {label} exited {rc}; its output ends:\n{log.read_text()[-3000:]}")
    hist = pq.read_table(storage / name / "history.parquet").to_pylist()
    summary = json.loads((storage / name / "summary.json").read_text())
    epochs = []
    for row in hist:
        end = sampler.epoch_end.get(row["epoch"])
        cpu = sampler.cpu(end - row["epoch_seconds"], end) if end else None
        epochs.append({"epoch": row["epoch"], "images_per_second": row["images_per_second"],
                       "epoch_seconds": row["epoch_seconds"], "val_accuracy": row["val_accuracy"], "cpu": cpu,
                       "decode_cpu_share": (cpu["cpu_s"].get("data_task", 0.0) / cpu["total_cpu_s"]
                                            if cpu and cpu["total_cpu_s"] else None),
                       "read_cpu_share": (cpu["cpu_s"].get("data_read", 0.0) / cpu["total_cpu_s"]
                                          if cpu and cpu["total_cpu_s"] else None)})
    titles = {kind: sorted(seen) for kind, seen in sorted(sampler.titles.items())}
    return {"label": label, "wall_seconds": round(wall, 1), "epochs": epochs, "peaks": sampler.peaks(),
            "train_worker_peaks_mib": sampler.per_worker_peaks(), "kinds_seen": titles,
            "samples": len(sampler.samples), "test_accuracy": summary.get("test_accuracy"),
            "printed": [line for line in log.read_text().splitlines() if line.startswith("raysweep train:")]}


# --- the benchmark -----------------------------------------------------------------------------

def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ratio(a, b):
    return a / b if a and b else None


def memory_half(size: dict, workdir: Path) -> tuple[dict, list]:
    n = size["n"]
    sets = {label: synthetic_set(n if label == "N" else SCALE * n, size) for label in size.get("sizes", ("N", "10N"))}
    runs = {}
    for label, (root, _) in sets.items():
        runs[label] = train_run(f"synthetic-{label}", [
            "data.name=parquet", f"data.root={root}", f"data.image_size={size['image_size']}",
            "data.streaming=true", "train.epochs=1", f"train.batch_size={size['batch']}", *SYNTH_OVERRIDES], workdir)
        runs[label]["images"] = n if label == "N" else SCALE * n
        runs[label]["generate_seconds"] = round(sets[label][1], 1)
    large = runs.get("10N", {"peaks": {}})
    ratios = {kind: _ratio(large["peaks"].get(kind, {}).get("rss_mib"), runs["N"]["peaks"].get(kind, {}).get("rss_mib"))
              for kind in sorted(set(runs["N"]["peaks"]) | set(large["peaks"]))}
    anon_ratios = {kind: _ratio(large["peaks"].get(kind, {}).get("anon_mib"),
                                runs["N"]["peaks"].get(kind, {}).get("anon_mib")) for kind in ratios}
    return {"runs": runs, "rss_ratio": ratios, "anon_ratio": anon_ratios}, [root for root, _ in sets.values()]


def throughput_half(cfg: dict, workdir: Path) -> dict:
    root = cifar_root()
    if not (root / "train.parquet").is_file():
        return {"skipped": f"no CIFAR-10 Parquet at {root} (set RAYSWEEP_CIFAR10=DIR)"}
    data = cifar_subset(root, cfg["train"], cfg["test"])
    base = [f"data.root={data}", f"train.epochs={cfg['epochs']}", *CIFAR_OVERRIDES]
    sides = {"in_memory": [], "streaming": []}
    for r in range(cfg["rounds"]):
        order = ["in_memory", "streaming"] if r % 2 == 0 else ["streaming", "in_memory"]
        for side in order:
            stream = "true" if side == "streaming" else "false"
            sides[side].append(train_run(f"cifar10-{side}-{r}", base + [f"data.streaming={stream}"], workdir))
    last = {side: [run["epochs"][-1]["images_per_second"] for run in runs] for side, runs in sides.items()}
    ratio = median(last["streaming"]) / median(last["in_memory"])
    return {"data": str(data), "epochs": cfg["epochs"], "rounds": cfg["rounds"], "sides": sides,
            "images_per_second_last_epoch": last, "ratio": ratio}


def run(mode: str = "full", keep_runs: bool = False) -> Result:
    size = SIZES[mode]
    workdir = Path(tempfile.mkdtemp(prefix="raysweep-bench-data-scale-"))
    try:
        mem, roots = memory_half(size, workdir)
        thr = throughput_half(size["cifar"], workdir) if size["cifar"] else {"skipped": "not in smoke mode"}
    finally:
        if not keep_runs:
            shutil.rmtree(workdir, ignore_errors=True)

    runs = mem["runs"]
    judged = {k: mem["rss_ratio"].get(k) for k in ("driver", "train_worker")}
    value = max((v for v in judged.values() if v is not None), default=None)
    rss_met = None if value is None else value <= TARGET_RSS  # None: not measured (smoke)
    thr_ratio = thr.get("ratio")
    thr_met = None if thr_ratio is None else thr_ratio >= TARGET_THROUGHPUT

    def row(label, run_, extra=""):
        ep = run_["epochs"][-1]
        p = run_["peaks"]
        cpu = ep["cpu"] or {}
        get = lambda k: p.get(k, {}).get("rss_mib")
        return [label + extra, run_.get("images"), get("driver"), get("train_worker"), get("data_task"),
                get("raylet"), p.get("all (sum)", {}).get("anon_mib"), ep["images_per_second"],
                ep["decode_cpu_share"], ep.get("read_cpu_share"),
                cpu.get("total_cpu_s", 0) / cpu["seconds"] if cpu.get("seconds") else None, run_["wall_seconds"]]

    rows = [row(f"streamed {k}", runs[k]) for k in runs]
    if "10N" in runs:
        rows.append(["ratio 10N / N", SCALE, judged["driver"], judged["train_worker"],
                     mem["rss_ratio"].get("data_task"), mem["rss_ratio"].get("raylet"),
                     mem["anon_ratio"].get("all (sum)"), _ratio(runs["10N"]["epochs"][-1]["images_per_second"],
                                                                runs["N"]["epochs"][-1]["images_per_second"]),
                     None, None, None, None])
    if "sides" in thr:
        for side in ("in_memory", "streaming"):
            for i, run_ in enumerate(thr["sides"][side]):
                rows.append(row(f"CIFAR-10 {side.replace('_', '-')} #{i + 1}", run_))
        rows.append(["ratio streamed / in-memory", None, None, None, None, None, None, thr_ratio, None, None, None,
                     None])

    n = size["n"]
    notes = [
        f"memory: generated JPEGs of {size['min_px']}-{size['max_px']} px (height and width drawn separately), "
        f"N = {n} and 10N = {SCALE * n} images{'' if '10N' in runs else ' (smoke: the N run only)'} in Parquet shards of {size['shard']}, resized to "
        f"{size['image_size']} px by Ray Data's decode tasks (data.streaming=true); simple_cnn, batch {size['batch']}, "
        f"1 epoch; default splits (val 15%, test 20% carved by hash), so the epoch trains on ~65% of the images "
        f"and the run ends with a streamed test evaluation",
        f"RSS: peak VmRSS (MiB) of one process of each kind over the whole run (start-up, epoch, test evaluation), "
        f"sampled every {SAMPLE_S} s from /proc; VmRSS includes pages of Ray's shared-memory object store that "
        f"the process touched. Headline = max(driver ratio, train worker ratio) = {_fmt(value)} "
        f"(target <= {TARGET_RSS}: {'met' if rss_met else 'MISSED'}); RssAnon ratios (private memory) in details. "
        f"'all anon' = the peak of the sum of RssAnon over every process of the run",
        "images/s: raysweep's own history.parquet (images_per_second: training images / training-pass seconds), "
        "of the last epoch (the only one for the generated sets, so it includes the stream's start-up)",
        "decode CPU share: CPU seconds (user + system, /proc/PID/stat) of the processes running Ray Data tasks "
        "(title ray::MapBatches(decode_batch): split hash, JPEG decode, resize/crop, block building; a pooled "
        "worker's interval counts when it showed such a title at either end) / CPU "
        "seconds of every process of the run (driver, GCS, raylet, Ray's helpers, controller, train worker, data "
        "tasks) over the epoch's wall time (progress.json's report time minus epoch_seconds, training pass + "
        "validation). Ray Data 2.60 reads Parquet in tasks of their own (ray::ListFiles, FooterReader, "
        "ReadFilesParquetV2: 'data_read', share in details as read_cpu_share). Worker processes still starting "
        "(not yet titled) count as 'ray_system'. Not counted as decode: Ray Data's executor and the iterator's "
        "batching and local shuffle "
        "inside the train worker, Ray Data's actors (SplitCoordinator, DatasetManager, _StatsActor: "
        "'data_coordinator'), the object store's copies in the raylet. The window starts up to a report's latency "
        "late (updated_at is written after the epoch's checkpoint and report). "
        "'cores used' = all the run's CPU seconds / wall seconds in that window",
    ]
    if "skipped" in thr:
        notes.append(f"throughput (target >= {TARGET_THROUGHPUT}): skipped, {thr['skipped']}; met: None")
    else:
        notes.append(
            f"throughput: CIFAR-10 ({thr['data']}), {' '.join(CIFAR_OVERRIDES)}, {thr['epochs']} epochs, "
            f"{thr['rounds']} round(s) alternating "
            f"(round 1 in-memory first); ratio = median streamed / median in-memory images/s of epoch {thr['epochs']} "
            f"= {thr_ratio:.3f} (target >= {TARGET_THROUGHPUT}: {'met' if thr_met else 'MISSED'}). Both sides 1 "
            f"worker x 1 CPU: the in-memory side leaves the second core idle, the streamed one decodes on it")
    gen_s = sum(runs[k]["generate_seconds"] for k in runs)
    notes.append(f"data generated this run: {gen_s:.0f} s (0: from the cache {_shown(CACHE)}/)")
    details = {
        "rss_target": f"<= {TARGET_RSS}", "rss_ratio": mem["rss_ratio"], "anon_ratio": mem["anon_ratio"],
        "rss_met": rss_met, "throughput_target": f">= {TARGET_THROUGHPUT}", "throughput_ratio": thr_ratio,
        "throughput_met": thr_met, "sizes": {"N": n, "10N": SCALE * n, **{k: size[k] for k in size if k != "n"}},
        "data_sets": [str(r) for r in roots], "memory": runs, "throughput": thr,
    }
    return Result(
        name="data_scale", value=value, target=f"<= {TARGET_RSS} (and streamed/in-memory images/s >= "
                                               f"{TARGET_THROUGHPUT}, in details)",
        met=rss_met, unit="x (peak RSS at 10N / at N, worst of driver and train worker)",
        headers=["run", "images", "driver MiB", "worker MiB", "data task MiB", "raylet MiB", "all anon MiB",
                 "img/s", "decode cpu share", "read cpu share", "cores used", "wall s"],
        rows=rows, notes=notes, details=details,
    )
