import pytest
import torch

from trainers.augment import augment_batch, random_affine, random_crop, random_flip
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
