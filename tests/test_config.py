from pathlib import Path

import pytest

from trainers.config import TrainRunConfig, load_run_config
from trainers.configtools import ConfigError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


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
def test_every_shipped_example_config_loads(path):
    assert load_run_config(str(path)).model.name
