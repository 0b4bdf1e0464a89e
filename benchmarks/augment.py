"""augment: raysweep's batched tensor augmentation against torchvision's per-image
transforms through a DataLoader, in images per second. Target: >= 20x.

Both sides do the same work on the same uint8 CIFAR-shaped images: random crop of the
zero-padded image, horizontal flip, rotation and shift (one bilinear resample), scaling
to float and per-channel standardising, ending with a float batch. The DataLoader runs
with 0 worker processes and with as many as there are cores (persistent, so their
start-up is not counted); the ratio is taken against the faster of the two. The process
runs with raysweep's malloc setting (``trainers.memory.keep_freed_memory``, as raysweep's
workers do), which the DataLoader's worker processes inherit: both sides have it.
"""

from __future__ import annotations

import os
import time

import torch

from benchmarks.common import Result, alternate, median, set_threads, spread

TARGET = 20.0
ROTATION, SHIFT, FLIP, PAD = 15.0, 0.1, 0.5, 4

# passes: the batched side's passes per sample, so that its samples last about as long as
# the DataLoader's (a single batched pass takes ~30-50 ms here, where a stray wake-up of
# another process shows as a 2-3x slower sample).
SIZES = {
    "full": dict(images=4096, batch=512, reps=5, passes=10),
    "quick": dict(images=2048, batch=512, reps=3, passes=10),
    "smoke": dict(images=256, batch=64, reps=1, passes=1),
}


class _Images(torch.utils.data.Dataset):
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


def per_image_transform(mean, std):
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.RandomCrop(32, padding=PAD),
        v2.RandomHorizontalFlip(FLIP),
        v2.RandomAffine(degrees=ROTATION, translate=(SHIFT, SHIFT), interpolation=InterpolationMode.BILINEAR),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def run(mode: str = "full") -> Result:
    from trainers.augment import augment_batch
    from trainers.config import AugmentConfig
    from trainers.loop import Normalizer
    from trainers.memory import keep_freed_memory

    size = SIZES[mode]
    threads = set_threads()
    keep_freed_memory()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (size["images"], 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (size["images"],), generator=gen)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    cfg = AugmentConfig(rotation=ROTATION, shift=SHIFT, flip=FLIP, crop_padding=PAD)
    normalize = Normalizer(mean, std)
    bs = size["batch"]

    def batched():
        g = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        for _ in range(size["passes"]):
            for idx in torch.randperm(len(x), generator=g).split(bs):
                out = augment_batch(normalize(x.index_select(0, idx)), cfg, g)  # as raysweep's training loop
        assert out.dtype == torch.float32 and out.shape[1:] == (3, 32, 32)
        return (time.perf_counter() - start) / size["passes"]  # seconds per pass

    transform = per_image_transform(mean, std)
    workers = os.cpu_count() or 1
    loaders = {
        "DataLoader, 0 workers": torch.utils.data.DataLoader(_Images(x, y, transform), batch_size=bs, shuffle=True),
        f"DataLoader, {workers} workers": torch.utils.data.DataLoader(
            _Images(x, y, transform), batch_size=bs, shuffle=True, num_workers=workers, persistent_workers=True,
            prefetch_factor=2),
    }

    def through(loader):
        def side():
            for xb, _ in loader:
                out = xb
            assert out.dtype == torch.float32 and out.shape[1:] == (3, 32, 32)
        return side

    sides = {"batched augment_batch": batched, **{k: through(v) for k, v in loaders.items()}}
    t0 = time.perf_counter()
    try:
        samples = alternate(sides, reps=size["reps"], warmup=1)
    finally:  # stop the persistent loader workers now, not at interpreter exit
        for loader in loaders.values():
            if getattr(loader, "_iterator", None) is not None:
                loader._iterator._shutdown_workers()
    ips = {k: size["images"] / median(v) for k, v in samples.items()}
    best_loader = max((k for k in ips if k.startswith("DataLoader")), key=ips.get)
    ratio = ips["batched augment_batch"] / ips[best_loader]
    rows = [[k, ips[k], median(v), spread(v), ips[k] / ips[best_loader]] for k, v in samples.items()]
    return Result(
        name="augment", value=ratio, target=f">= {TARGET:g}", met=ratio >= TARGET,
        unit=f"x (batched images/s / {best_loader} images/s)",
        headers=["side", "images/s", "s per pass", "spread s", f"x {best_loader}"], rows=rows,
        notes=[f"{size['images']} uint8 3x32x32 images, batch {bs}: crop (pad {PAD}), flip p={FLIP}, rotation "
               f"+-{ROTATION:g} deg and shift +-{SHIFT:g} (bilinear), to float, standardise; {threads} torch "
               f"threads; raysweep's malloc setting on both sides; 1 warm-up sample then {size['reps']} "
               f"alternating samples per side, medians; a DataLoader sample is one pass, a batched one the "
               f"mean of {size['passes']} passes in a row"],
        details={"images_per_second": ips, "seconds": samples, "ratio": ratio, "against": best_loader,
                 "threads": threads, "images": size["images"], "batch": bs, "batched_passes": size["passes"],
                 "seconds_total": time.perf_counter() - t0},
    )
