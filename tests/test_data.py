import pytest
import torch

from trainers.config import DataConfig
from trainers.data import DataError, load_data, write_parquet_images


def test_digits_are_real_bundled_digits_split_without_overlap():
    d = load_data(DataConfig())
    assert d.shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert d.train.x.dtype == torch.uint8 and int(d.train.x.max()) == 255
    again = load_data(DataConfig())
    assert torch.equal(d.val.y, again.val.y)  # deterministic, seeded
    assert not torch.equal(load_data(DataConfig(seed=1)).val.y, d.val.y)


def test_synthetic_any_shape():
    d = load_data(DataConfig(name="synthetic", num_samples=100, image_size=10, channels=2, num_classes=3))
    assert d.shape == (2, 10, 10) and d.num_classes == 3 and len(d.mean) == 2


def test_parquet_directory_gives_train_and_test(tiny_parquet):
    d = load_data(DataConfig(name="parquet", root=str(tiny_parquet)))
    assert len(d.test) == 80 and len(d.train) + len(d.val) == 320
    assert d.classes == [f"class_{i}" for i in range(4)]


def test_imagefolder_and_corrupt_image_named(tmp_path):
    from torchvision.io import write_png

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            write_png(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), str(tmp_path / cls / f"{i}.png"))
    d = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_fraction=0.2, test_fraction=0.2))
    assert d.classes == ["cat", "dog"] and d.shape == (3, 8, 8)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_mixed_sizes_are_refused(tmp_path):
    from torchvision.io import write_png

    (tmp_path / "a").mkdir()
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "a" / "small.png"))
    write_png(torch.zeros(3, 9, 9, dtype=torch.uint8), str(tmp_path / "a" / "big.png"))
    with pytest.raises(DataError, match="mixed sizes"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_labels_out_of_range(tmp_path):
    x = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    write_parquet_images(tmp_path / "t.parquet", x, torch.tensor([0, 1, 0, 1, 0, 7]), classes=["a", "b"])
    with pytest.raises(DataError, match="outside 0..1"):
        load_data(DataConfig(name="parquet", root=str(tmp_path / "t.parquet")))


def test_missing_paths_name_the_field(tmp_path):
    with pytest.raises(DataError, match="data.root: .* does not exist"):
        load_data(DataConfig(name="parquet", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="needs a path"):
        load_data(DataConfig(name="imagefolder"))
    with pytest.raises(DataError, match="data.download=true"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))
