"""`raysweep data convert`: real image files in, real Parquet shards out (local and S3)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.io import decode_image, encode_jpeg, encode_png

from cluster.cli import main
from cluster.convert import MANIFEST, SUCCESS, ConvertConfig, convert

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["cat", "dog", "eel"]
SIZES = [(20, 30), (33, 17), (24, 24), (16, 40)]
PER_CLASS = 8  # jpeg/png images per class, plus one BMP in eel
GOOD = 3 * PER_CLASS + 1
BAD = {"cat/broken.jpg": b"this is not a jpeg at all", "dog/empty.png": b""}
IGNORED = ["eel/notes.txt", "README.md"]


def make_folder(root: Path, per_class: int = PER_CLASS, sizes=SIZES) -> Path:
    """Noise images (they do not compress) of mixed sizes, PNG and JPEG, RGB and grey."""
    gen = torch.Generator().manual_seed(0)
    for label, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            channels = 1 if i == 3 else 3
            img = torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=gen)
            data = encode_png(img) if i % 2 else encode_jpeg(img, quality=95)
            (root / cls / f"{cls}{i:02d}.{'png' if i % 2 else 'jpg'}").write_bytes(data.numpy().tobytes())
    bmp = BytesIO()
    Image.fromarray(torch.randint(0, 256, (10, 14, 3), dtype=torch.uint8, generator=gen).numpy()).save(bmp, "BMP")
    (root / "eel" / "eel_bitmap.bmp").write_bytes(bmp.getvalue())  # torchvision cannot decode BMP
    for rel, data in BAD.items():
        (root / rel).write_bytes(data)
    for rel in IGNORED:
        (root / rel).write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "src")


def shards(dst: Path) -> list[Path]:
    return sorted(dst.glob("*.parquet"))


def rows(dst: Path) -> list[tuple]:
    """Every row of every shard, in shard order."""
    out = []
    for f in shards(dst):
        t = pq.read_table(f)
        out += list(zip(t["path"].to_pylist(), t["label"].to_pylist(), t["image"].to_pylist()))
    return out


def convert_cli(src, dst, *extra) -> int:
    return main(["data", "convert", str(src), str(dst), *map(str, extra)])


def test_converts_folder_into_shards_training_layout(folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert convert_cli(folder, dst, "--shard-mb", 0.01, "--format", "png") == 0
    out = capsys.readouterr()
    assert f"converted {GOOD} images of 3 classes" in out.out and "2 bad files" in out.out and "2 ignored" in out.out

    files = shards(dst)
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))]
    assert len(files) >= 4  # ~10 KiB shards of 1-4 KiB images
    table = pq.read_table(files[0])
    assert table.column_names == ["image", "label", "path"]
    assert str(table.schema.field("label").type) == "int16"
    meta = table.schema.metadata
    assert json.loads(meta[b"classes"]) == CLASSES and meta[b"format"] == b"png"

    got = rows(dst)
    assert len(got) == GOOD == len({p for p, _, _ in got})  # exact count, no duplicates
    for path, label, image in got:
        assert CLASSES[label] == path.split("/")[0]
        assert image[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = Image.open(folder / path).size
        converted = decode_image(torch.frombuffer(bytearray(image), dtype=torch.uint8))
        assert tuple(converted.shape) == (3, height, width)  # size kept; grey became RGB
    # shuffled before sharding: shards mix classes instead of running through them in order
    assert sum(len(set(pq.read_table(f)["label"].to_pylist())) > 1 for f in files) >= len(files) // 2

    with open(dst / "_bad_files.csv") as f:
        bad = {r["path"]: r["error"] for r in csv.DictReader(f)}
    assert set(bad) == set(BAD) and "empty" in bad["dog/empty.png"] and "not a readable image" in bad["cat/broken.jpg"]
    summary = json.loads((dst / SUCCESS).read_text())
    assert (summary["images"], summary["shards"], summary["bad_files"], summary["ignored_files"]) == (GOOD, len(files), 2, 2)


def test_image_size_gives_exact_size_and_training_reader_decodes(folder, tmp_path):
    from trainers.data import read_parquet_images

    dst = tmp_path / "dst"
    assert convert_cli(folder, dst, "--image-size", 12, 20, "--format", "jpeg", "--quality", 80) == 0
    assert len(shards(dst)) == 1  # default 128 MiB
    x, y, _ = read_parquet_images(shards(dst)[0])
    assert x.shape[0] == GOOD and tuple(x.shape[2:]) == (12, 20)  # mixed sources, one size out
    assert y.tolist() == [CLASSES.index(p.split("/")[0]) for p, _, _ in rows(dst)]


def test_16_bit_alpha_and_grey_become_uint8_rgb(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    src = tmp_path / "src" / "odd"
    src.mkdir(parents=True)
    pixels = {"deep16.png": np.arange(100 * 60, dtype=np.uint16).reshape(100, 60) * 10,
              "rgba.png": np.full((30, 50, 4), 200, np.uint8), "grey_alpha.png": np.full((40, 40, 2), 9, np.uint8),
              "grey.jpg": np.full((20, 20), 77, np.uint8)}
    for name, array in pixels.items():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
        (src / name).write_bytes(buffer.getvalue())
    dst = tmp_path / "dst"
    assert convert_cli(tmp_path / "src", dst, "--image-size", 8, 8, "--format", "png") == 0
    images = [decode_image(torch.frombuffer(bytearray(image), dtype=torch.uint8)) for _, _, image in rows(dst)]
    assert len(images) == 4 and all(i.dtype == torch.uint8 and tuple(i.shape) == (3, 8, 8) for i in images)


def test_format_keep_copies_bytes_untouched(folder, tmp_path):
    dst = tmp_path / "dst"
    assert convert_cli(folder, dst, "--format", "keep", "--shard-mb", 0.02) == 0
    got = rows(dst)
    assert len(got) == GOOD - 1  # training could not decode the BMP's bytes: a bad file here
    assert "eel/eel_bitmap.bmp" in (dst / "_bad_files.csv").read_text()
    assert all(image == (folder / path).read_bytes() for path, _, image in got)
    assert pq.read_table(shards(dst)[0]).schema.metadata[b"format"] == b"original"


def test_resume_after_stop_equals_a_clean_run(folder, tmp_path, capsys):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert convert_cli(folder, clean, "--shard-mb", 0.01, "--format", "png") == 0
    cfg = ConvertConfig(str(folder), str(resumed), shard_mb=0.01, format="png")
    assert convert(cfg, stop_after_shards=2, progress=False) == {"complete": False, "shards": 2}
    assert len(shards(resumed)) == 2 and not (resumed / SUCCESS).exists()
    # What a kill mid-write leaves: a torn temporary (local) and a torn object (object stores,
    # written in place) for the next shard, which the manifest does not list yet.
    (resumed / ".part-00002.parquet.deadbeef.tmp").write_bytes(b"PAR1 torn")
    (resumed / "._convert_manifest.json.deadbeef.tmp").write_bytes(b"{")
    (resumed / "part-00002.parquet").write_bytes(b"PAR1 torn")

    assert convert_cli(folder, resumed, "--shard-mb", 0.01, "--format", "png") == 0
    assert [f.name for f in shards(resumed)] == [f.name for f in shards(clean)]
    assert not list(resumed.glob(".*.tmp"))
    for a, b in zip(shards(clean), shards(resumed)):
        assert pq.read_table(a).equals(pq.read_table(b))  # every shard whole, same rows, same order
    assert (resumed / "_bad_files.csv").read_text() == (clean / "_bad_files.csv").read_text()

    # A finished conversion re-run is a no-op that reports the same summary.
    before = {f.name: f.stat().st_mtime_ns for f in shards(resumed)}
    capsys.readouterr()
    assert convert_cli(folder, resumed, "--shard-mb", 0.01, "--format", "png") == 0
    assert f"converted {GOOD} images" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in shards(resumed)} == before


def test_resume_with_other_options_or_changed_source_is_refused(folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    convert(ConvertConfig(str(folder), str(dst), shard_mb=0.01, format="png"), stop_after_shards=1, progress=False)
    capsys.readouterr()
    assert convert_cli(folder, dst, "--shard-mb", 0.01, "--format", "jpeg") == 2
    err = capsys.readouterr().err
    assert str(dst) in err and "--format: was 'png', now 'jpeg'" in err and "--shard-mb" not in err
    (folder / "cat" / "new.png").write_bytes((folder / "cat" / "cat01.png").read_bytes())
    assert convert_cli(folder, dst, "--shard-mb", 0.01, "--format", "png") == 2
    assert "source files changed" in capsys.readouterr().err


def test_killed_process_resumes(tmp_path):
    """A real SIGKILL in the middle of a run of many one-image shards."""
    src = make_folder(tmp_path / "src", per_class=25, sizes=[(8, 8)])
    dst, clean = tmp_path / "dst", tmp_path / "clean"
    cmd = [sys.executable, "-m", "cluster.cli", "data", "convert", str(src), str(dst), "--shard-mb", "0.0001",
           "--format", "png", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(shards(dst)) < 5:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((dst / MANIFEST).read_text())
    assert not manifest["complete"], "the run finished before it was killed; make it longer"

    assert main(cmd[3:]) == 0  # the resume itself need not pay for another interpreter
    convert(ConvertConfig(str(src), str(clean), shard_mb=0.0001, format="png"), progress=False)
    assert [f.name for f in shards(dst)] == [f.name for f in shards(clean)]
    assert rows(dst) == rows(clean) and len(rows(dst)) == 3 * 25 + 1


def test_refused_requests_exit_2(folder, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cases = {
        "no such directory": ([str(tmp_path / "missing"), str(tmp_path / "d1")], str(tmp_path / "missing")),
        "no class folders": ([str(folder / "cat"), str(tmp_path / "d2")], str(folder / "cat")),
        "not writable": ([str(folder), str(tmp_path / "a_file" / "sub")], "a_file"),
        "cannot resize": ([str(folder), str(tmp_path / "d3"), "--format", "keep", "--image-size", "8", "8"], "--image-size"),
        "shard_mb": ([str(folder), str(tmp_path / "d4"), "--shard-mb", "0"], "must be > 0"),
        "inside src": ([str(folder), str(folder / "out")], "Choose a destination outside"),
    }
    for what, (argv, named) in cases.items():
        assert main(["data", "convert", *argv]) == 2, what
        err = capsys.readouterr().err
        assert what in err and named in err, (what, err)


def test_refuses_a_destination_holding_other_parquet_files(folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "train.parquet").write_bytes(b"someone else's")
    assert convert_cli(folder, dst) == 2
    assert "choose an empty destination" in capsys.readouterr().err


# -- S3 (moto on loopback) --------------------------------------------------------------


def test_convert_to_and_from_s3(s3_server, folder, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bucket")
    assert convert_cli(folder, "s3://bucket/shards", "--shard-mb", 0.01, "--format", "png") == 0
    fs, root = pafs.FileSystem.from_uri("s3://bucket/shards")
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root)))
    parts = [n for n in names if n.endswith(".parquet")]
    assert {MANIFEST, SUCCESS, "_bad_files.csv"} <= set(names) and not any(n.endswith(".tmp") for n in names)
    table = pq.read_table([f"{root}/{n}" for n in parts], filesystem=fs)
    assert table.num_rows == GOOD and sorted(set(table["label"].to_pylist())) == [0, 1, 2]

    # An S3 source (directories exist only as key prefixes there) and a local destination,
    # stopped once and resumed: same rows as the local-to-S3 run.
    for path in folder.rglob("*"):
        if path.is_file():
            s3.put_object(Bucket="bucket", Key=f"src/{path.relative_to(folder)}", Body=path.read_bytes())
    dst = tmp_path / "from_s3"
    convert(ConvertConfig("s3://bucket/src", str(dst), shard_mb=0.01, format="png"), stop_after_shards=1, progress=False)
    assert convert_cli("s3://bucket/src", dst, "--shard-mb", 0.01, "--format", "png") == 0
    assert pq.read_table(dst).sort_by("path").equals(table.sort_by("path").replace_schema_metadata(
        pq.read_table(dst).schema.metadata))


def test_unreachable_s3_endpoint_exits_2_quickly(folder, monkeypatch, capsys):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    assert convert_cli(folder, "s3://nowhere/shards") == 2
    assert time.monotonic() - start < 15
    assert "s3://nowhere/shards" in capsys.readouterr().err
