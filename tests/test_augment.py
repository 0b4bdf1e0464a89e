import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.augment import alternating_flips, augment_batch, random_affine, random_crop, random_flip
from trainers.config import AugmentConfig


def _batch(n=8, c=3, h=12, w=12):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(1))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_all_off_is_identity():
    x = _batch()
    assert augment_batch(x, AugmentConfig(), _gen()) is x


@pytest.mark.parametrize("cfg", [AugmentConfig(rotation=30), AugmentConfig(shift=0.2), AugmentConfig(flip=0.5),
                                 AugmentConfig(crop_padding=3),
                                 AugmentConfig(rotation=15, shift=0.1, flip=0.5, crop_padding=2)])
def test_shapes_dtype_and_range_are_kept(cfg):
    x = _batch()
    y = augment_batch(x, cfg, _gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 - 1e-6 and y.max() <= 1 + 1e-6  # zero fill and bilinear mixing stay in range
    assert not torch.equal(y, x)


def test_flip_probability_one_mirrors_every_image():
    x = _batch()
    assert torch.equal(random_flip(x, 1.0, _gen()), x.flip(3))


def test_flip_half_mirrors_some_and_keeps_others():
    x = _batch(n=200)
    y = random_flip(x, 0.5, _gen())
    flipped = [(torch.equal(a, b.flip(2))) for a, b in zip(y, x)]
    assert 60 < sum(flipped) < 140


def test_alternating_flip_shows_each_image_the_other_way_round_every_epoch():
    first, second, third = (alternating_flips(200, epoch, seed=3) for epoch in (1, 2, 3))
    assert torch.equal(second, ~first) and torch.equal(third, first)
    assert 60 < int(first.sum()) < 140  # a random half, not a pattern
    assert not torch.equal(alternating_flips(200, 1, seed=4), first)
    x = _batch(n=200)
    y = augment_batch(x, AugmentConfig(flip=0.5, alternate_flip=True), _gen(), flips=first)
    assert all(torch.equal(b, a.flip(2) if f else a) for a, b, f in zip(x, y, first))


def test_crop_is_a_translated_window_of_the_padded_image():
    x = _batch(n=16)
    y = random_crop(x, 2, _gen())
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for img, pad in zip(y, padded):
        windows = [pad[:, dy:dy + 12, dx:dx + 12] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(img, w) for w in windows)


def test_rotation_of_zero_with_no_shift_is_identity_and_rotation_moves_pixels():
    x = _batch()
    assert random_affine(x, 0, 0, _gen()) is x
    y = random_affine(x, 90, 0, _gen())
    assert (y - x).abs().mean() > 0.05


def test_augmentation_is_seeded():
    x = _batch()
    cfg = AugmentConfig(rotation=10, shift=0.1, flip=0.5, crop_padding=2)
    assert torch.equal(augment_batch(x, cfg, _gen(3)), augment_batch(x, cfg, _gen(3)))


def test_reflection_fill_crop_is_a_window_of_the_mirrored_image():
    """grid_sample's reflection repeats the edge pixel: numpy's ``symmetric`` padding."""
    x = _batch(n=16)
    y = augment_batch(x, AugmentConfig(crop_padding=2, fill="reflection"), _gen())
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="symmetric"))
    for img, pad in zip(y, padded):
        windows = [pad[:, dy:dy + 12, dx:dx + 12] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(img, w) for w in windows)
    assert (y == 0).sum() == 0  # nothing comes from a zero border


@pytest.mark.parametrize("fill", ["zeros", "reflection"])
def test_the_benchmarks_plain_loop_crops_and_flips_exactly_as_raysweep(fill):
    """benchmarks.plain.crop_flip (pad + masked copies) against the fused resample: the same
    draws give the same batch, so the cifar10 benchmark's two sides see the same images."""
    from benchmarks.plain import crop_flip

    x = _batch(n=64)
    ours = augment_batch(x, AugmentConfig(crop_padding=2, flip=0.5, fill=fill), _gen(5))
    assert torch.equal(ours, crop_flip(x, 2, 0.5, _gen(5), fill=fill))


def test_reflection_fill_with_rotation_leaves_no_blank_corners():
    x = _batch(n=16) + 1
    zeros = augment_batch(x, AugmentConfig(rotation=45, crop_padding=2), _gen())
    mirrored = augment_batch(x, AugmentConfig(rotation=45, crop_padding=2, fill="reflection"), _gen())
    assert (zeros == 0).sum() > 0 and (mirrored == 0).sum() == 0


def _reference(x, cfg, gen):
    """The three augmentations one after another, the plain way (pad and slice each image,
    flip, then F.affine_grid + F.grid_sample), drawing the same random numbers in order."""
    n, _, h, w = x.shape
    p = cfg.crop_padding
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    padded = F.pad(x, (p,) * 4)
    x = torch.stack([img[:, y:y + h, z:z + w] for img, y, z in zip(padded, dy.tolist(), dx.tolist())])
    flip = torch.rand(n, generator=gen) < cfg.flip
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * cfg.rotation * math.pi / 180
    tx = (torch.rand(n, generator=gen) * 2 - 1) * 2 * cfg.shift
    ty = (torch.rand(n, generator=gen) * 2 - 1) * 2 * cfg.shift
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize("cfg", [AugmentConfig(rotation=15, shift=0.1, flip=0.5, crop_padding=4),
                                 AugmentConfig(rotation=60, shift=0.3, flip=0.5, crop_padding=6)])
def test_one_fused_resample_equals_crop_flip_then_rotate(cfg):
    """The fused resample keeps the crop's zero border: a rotation reaching past the crop
    window reads zeros there, not the pixels the crop cut away."""
    x = _batch(n=16, h=12, w=20)
    fused = augment_batch(x, cfg, _gen(4))
    assert torch.allclose(fused, _reference(x, cfg, _gen(4)), atol=1e-5)
    g = _gen(4)
    steps = random_affine(random_flip(random_crop(x, cfg.crop_padding, g), cfg.flip, g), cfg.rotation, cfg.shift, g)
    assert torch.allclose(fused, steps, atol=1e-5)


def test_crop_and_flip_alone_copy_whole_pixels_and_keep_channels_last():
    x = _batch(n=16).contiguous(memory_format=torch.channels_last)
    y = augment_batch(x, AugmentConfig(flip=0.5, crop_padding=3), _gen())
    assert y.is_contiguous(memory_format=torch.channels_last)
    values = set(x.flatten().tolist()) | {0.0}
    assert set(y.flatten().tolist()) <= values  # nearest-pixel copies: no value is interpolated
