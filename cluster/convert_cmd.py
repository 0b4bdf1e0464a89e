"""`raysweep data convert`: an image folder -> Parquet shards that training reads.

The conversion itself is ``cluster.convert.convert``; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import sys

from cluster.cli import EXIT_FAILED, EXIT_OK, command, non_negative_int


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    from cluster.convert import FORMATS

    p.add_argument("src", metavar="SRC", help="image folder SRC/<class>/*.jpg|png, local or a URI (s3://bucket/prefix)")
    p.add_argument("dst", metavar="DST", help="directory or URI for part-NNNNN.parquet; re-running resumes")
    p.add_argument("--shard-mb", type=float, default=128.0, help="MiB of encoded images per shard (default 128)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize to cover H x W (aspect kept), then center-crop to exactly H x W")
    p.add_argument("--format", choices=FORMATS, default="jpeg",
                   help="jpeg (default) or png re-encode; keep copies the original bytes (no --image-size)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    p.add_argument("--channels", type=int, choices=(3, 1), default=3,
                   help="re-encoded images: 3 = RGB (grey expanded, alpha dropped; default) or 1 = grey")
    p.add_argument("--threads", type=non_negative_int, default=0, help="decode/encode threads (default: one per core, at least 2)")


def _arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="data_action", required=True, metavar="ACTION")
    _convert_arguments(actions.add_parser(
        "convert", help="image folder -> Parquet shards (image, label, path), resumable",
        description="Turn SRC/<class>/*.jpg|png into Parquet shards under DST in the layout data.name=parquet "
                    "reads. Killed runs resume where they stopped; bad images are skipped and listed in "
                    "DST/_bad_files.csv."))


@command("data", "prepare data sets (data convert: image folder -> Parquet shards)")(_arguments)
def _data(args) -> int:
    from cluster.convert import ConvertConfig, convert, summary_line

    cfg = ConvertConfig(src=args.src, dst=args.dst, shard_mb=args.shard_mb,
                        image_size=tuple(args.image_size) if args.image_size else None,
                        format=args.format, quality=args.quality, channels=args.channels,
                        threads=args.threads)
    try:
        summary = convert(cfg)
    except OSError as e:  # refusals were raised before any work as DataError (exit 2)
        print(f"raysweep data convert: stopped by an I/O error ({e}); the shards written so far are "
              "whole and recorded: re-run the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    print(summary_line(summary))
    return EXIT_OK if summary["images"] else EXIT_FAILED
