"""Image work of `raysweep data convert`: one channel count, the cover-and-crop resize, the
encoders, PIL for what torchvision cannot read, and the progress display."""

from __future__ import annotations

import math
import sys

from trainers.configtools import clean_error


def cover_and_crop(img, height: int, width: int):
    """Resize (C, h, w) so that it covers height x width, keeping its aspect, then cut the
    centre: every output is exactly (C, height, width) and nothing is stretched."""
    from torchvision.transforms.v2 import functional as F

    scale = max(height / img.shape[-2], width / img.shape[-1])
    size = [max(height, math.ceil(img.shape[-2] * scale)), max(width, math.ceil(img.shape[-1] * scale))]
    return F.center_crop(F.resize(img, size, antialias=True), [height, width])


def with_channels(img, channels: int):
    """(C, H, W) with C in 1..4, uint8 or uint16 (16-bit PNG) -> uint8 (channels, H, W).
    Training stacks images into one tensor, so one set must not mix grey and colour;
    alpha is dropped (JPEG cannot hold it)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    if img.dtype != torch.uint8:  # the encoders take uint8 only
        img = F.to_dtype(img, torch.uint8, scale=True)
    if img.shape[0] in (2, 4):
        img = img[: img.shape[0] - 1]
    if img.shape[0] == channels:
        return img
    return img.expand(3, -1, -1) if channels == 3 else F.rgb_to_grayscale(img)


def encode(img, fmt: str, quality: int) -> bytes:
    from torchvision.io import encode_jpeg, encode_png

    out = encode_jpeg(img.contiguous(), quality=quality) if fmt == "jpeg" else encode_png(img.contiguous())
    return out.numpy().tobytes()


def decode_with_pil(data: bytes):
    """Encoded bytes -> uint8 (C, H, W) through PIL, or None where PIL cannot read them either."""
    import io

    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im if im.mode in ("L", "LA", "RGB", "RGBA") else im.convert("RGB")
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError):  # PIL's ways of saying "not an image"
        return None
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def short_error(error: str, limit: int = 300) -> str:
    """One line for the bad-files report, without library build paths (``clean_error``)."""
    error = " ".join(clean_error(error).split())
    return error if len(error) <= limit else error[: limit - 3] + "..."


class ProgressBar:
    """tqdm on a terminal; one line per shard otherwise (job logs do not render '\\r')."""

    def __init__(self, total: int, done: int, shards: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", file=sys.stderr, desc="convert")
            self.bar.set_postfix(shards=shards)

    def file_done(self) -> None:
        self.done += 1
        if self.bar:
            self.bar.update(1)

    def shard_done(self, shards: int) -> None:
        if self.bar:
            self.bar.set_postfix(shards=shards)
        elif self.enabled:
            print(f"convert: {self.done}/{self.total} files, {shards} shards written", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
