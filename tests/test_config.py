import re
from pathlib import Path

import pytest
import torch

from trainers.config import TrainRunConfig, load_run_config
from trainers.configtools import ConfigError
from trainers.models import ModelError
from trainers.transfer import read_pretrained

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_defaults_train_simple_cnn_on_digits():
    cfg = TrainRunConfig()
    assert (cfg.model.name, cfg.data.name) == ("simple_cnn", "digits")
    assert TrainRunConfig.from_dict(cfg.to_dict()) == cfg  # travels to workers as a dict


def test_alternating_flip_needs_half_the_images_flipped():
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["augment.alternate_flip=true", "augment.flip=0.3"])
    assert err.value.problems == ["augment.alternate_flip: true flips each image every other epoch, so it needs flip "
                                  "0.5, not 0.3; set flip: 0.5 or alternate_flip: false"]


def test_an_unknown_fill_names_the_choices():
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["augment.fill=reflect"])
    assert err.value.problems == ["augment.fill: 'reflect' is not a known fill; choose one of: reflection, zeros"]


def test_every_problem_is_reported_at_once_with_field_value_and_fix():
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["model.name=vgg", "optim.lr=-1", "train.epochs=ten", "data.colour=1",
                               "augment.flip=2", "train.early_stopping.metric=speed", "nokey"])
    problems = err.value.problems
    assert len(problems) == 7
    text = "\n".join(problems)
    assert ("model.name: 'vgg' is not a known model; choose one of: fast_cifar, fast_cifar95, resnet18, resnet50, "
            "simple_cnn") in text
    assert "optim.lr: -1.0 must be > 0.0" in text
    assert "train.epochs: 'ten' is not a valid int" in text
    assert "data.colour: unknown key; known keys here:" in text
    assert "augment.flip: 2.0 must be <= 1.0" in text
    assert "train.early_stopping.metric: 'speed'" in text
    assert "expected section.key=value" in text


def test_overrides_read_yaml_scalars_and_scientific_notation(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-3\ntrain:\n  epochs: 3\n")
    cfg = load_run_config(str(f), ["train.batch_size=32", "augment.flip=0.5", "model.pretrained=null"])
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 3 and cfg.train.batch_size == 32
    assert cfg.augment.flip == 0.5 and cfg.model.pretrained is None


def test_wrong_types_are_refused():
    with pytest.raises(ConfigError, match="train.channels_last: 'maybe' is not a valid bool"):
        TrainRunConfig.from_dict({"train": {"channels_last": "maybe"}})
    with pytest.raises(ConfigError, match="optim: expected a mapping"):
        TrainRunConfig.from_dict({"optim": 3})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no file at"):
        load_run_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(str(bad))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_loads_and_says_where_its_inputs_come_from(path, tmp_path, monkeypatch):
    """An input an example names is in the repository, or the example's comments tell the
    user how to get it: the command that fetches ImageNet weights (the one raysweep's own
    error names, since it never downloads), or what a data root must hold."""
    cfg = load_run_config(str(path))
    lines = path.read_text().splitlines()
    comments = "\n".join(line.split("#", 1)[1] for line in lines if "#" in line)
    for key, value in (("data.root", cfg.data.root), ("data.test_root", cfg.data.test_root)):
        if value is None or (ROOT / value).exists():
            continue
        line = next(ln for ln in lines if ln.strip().startswith(key.split(".")[1] + ":"))
        assert "#" in line or f"--set {key}=" in comments, f"{path.name}: say what {key} {value!r} must hold"
    if cfg.model.pretrained == "imagenet":
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
        with pytest.raises(ModelError, match="never downloads") as err:
            read_pretrained("imagenet")
        fetch = re.search(r"torchvision\.models\.resnet50\(weights='\w+'\)", str(err.value)).group(0)
        assert fetch in comments, f"{path.name}: tell the user to run {fetch} once"
    elif cfg.model.pretrained:
        assert (ROOT / cfg.model.pretrained).exists() or "model.pretrained=" in comments, path.name
    if cfg.model.freeze_backbone:  # a frozen random backbone would leave only the head to learn
        assert cfg.model.pretrained, f"{path.name}: freeze_backbone without pretrained weights"
