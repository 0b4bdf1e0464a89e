"""Transfer learning end to end, offline and without Ray: pretrain on one synthetic task,
fine-tune its checkpoint on another with a frozen backbone, and compare with training from
scratch (plain ``fit``, as a Ray worker runs it)."""

from __future__ import annotations

import json

import pytest
import torch

from trainers.checkpoints import save_state
from trainers.config import ModelConfig, TrainRunConfig
from trainers.data import load_data
from trainers.loop import ListReporter, WorkerContext, fit
from trainers.models import HEADS, ModelError, build_model

# Both tasks draw their class patterns from one seeded generator, so task B's 4 classes are
# task A's first 4 patterns: they share features, but B has a new head (4 classes, not 8),
# other images and only 32 of them.
COMMON = {"name": "synthetic", "image_size": 12, "channels": 3}
TASK_A = {**COMMON, "num_classes": 8, "num_samples": 600}
TASK_B = {**COMMON, "num_classes": 4, "num_samples": 600, "limit": 32, "seed": 1}
FINE_TUNE = {"epochs": 3, "batch_size": 8, "precision": "fp32"}


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """Task A trained 4 epochs; its last checkpoint saved as a train run leaves it."""
    cfg = TrainRunConfig.from_dict({"data": TASK_A, "optim": {"lr": 5e-3},
                                    "train": {"epochs": 4, "batch_size": 32, "precision": "fp32"}})
    rep = ListReporter()
    fit(cfg, load_data(cfg.data), WorkerContext(), rep)
    run = tmp_path_factory.mktemp("pretrain")
    save_state(rep.states[-1], run / "checkpoint_000003")
    (run / "summary.json").write_text(json.dumps({"status": "completed", "checkpoint": str(run / "checkpoint_000003")}))
    return run, rep.states[-1]["model"]


def _fine_tune(model: dict) -> ListReporter:
    cfg = TrainRunConfig.from_dict({"data": TASK_B, "model": model, "optim": {"lr": 1e-2}, "train": FINE_TUNE})
    rep = ListReporter()
    fit(cfg, load_data(cfg.data), WorkerContext(), rep)
    return rep


def test_fine_tuning_a_checkpoint_keeps_the_backbone_learns_a_new_head_and_beats_scratch(pretrained_run):
    run, pretrained = pretrained_run
    tuned = _fine_tune({"pretrained": str(run), "freeze_backbone": True})  # the run directory: its best checkpoint
    scratch = _fine_tune({})
    weights = tuned.states[-1]["model"]
    head = HEADS["simple_cnn"]
    backbone = [k for k in pretrained if not k.startswith(head)]
    assert backbone and all(torch.equal(weights[k], pretrained[k]) for k in backbone)  # frozen: unchanged
    assert weights[head + "weight"].shape == (4, 128) and pretrained[head + "weight"].shape == (8, 128)
    torch.manual_seed(0)  # as fit does before building: the new head's starting weights
    initial = build_model(ModelConfig(), 3, 12, 4)[11].weight
    assert not torch.equal(weights[head + "weight"], initial)  # the head learned
    tuned_acc, scratch_acc = tuned.metrics[-1]["val_accuracy"], scratch.metrics[-1]["val_accuracy"]
    # Measured here with train.seed 0-3: fine-tuned 0.49-0.54, scratch 0.24-0.33 (chance 0.25);
    # the smallest gap was 0.18.
    assert tuned_acc >= scratch_acc + 0.1 and tuned_acc > 0.4, (tuned_acc, scratch_acc)


def _checkpoint(tmp_path, name="simple_cnn", channels=3, classes=8):
    """A raysweep checkpoint (as ``fit`` writes it) of an untrained ``name``; returns its state.pt."""
    torch.manual_seed(1)
    net = build_model(ModelConfig(name=name), channels, 12, classes)
    meta = {"config": TrainRunConfig.from_dict({"model": {"name": name}}).to_dict(), "classes": list("abcdefgh")[:classes]}
    return save_state({"model": net.state_dict(), "meta": meta, "epoch": 1}, tmp_path / "checkpoint_000000"), net


def test_same_class_count_keeps_the_head_and_a_uri_state_pt_or_search_works(tmp_path):
    path, source = _checkpoint(tmp_path)
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "checkpoint_000000"}))  # a search, relative
    for spec in (str(path), f"file://{path.parent}", str(tmp_path)):
        net = build_model(ModelConfig(pretrained=spec), 3, 12, 8)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())


def test_freezing_the_backbone_fixes_its_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="resnet18", freeze_backbone=True), 3, 8, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net.train()
    torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8) * 3 + 1), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Weights and BatchNorm statistics alike: only the head moved.
    assert changed and all(k.startswith("fc.") for k in changed), changed


def test_unusable_pretrained_weights_are_refused_with_the_reason(tmp_path):
    path, _ = _checkpoint(tmp_path)
    cases = {
        "is a simple_cnn checkpoint but model.name is resnet18": ModelConfig(name="resnet18", pretrained=str(path)),
        "does not fit this simple_cnn": ModelConfig(pretrained=str(path)),  # built below with 1 channel
        "no file or directory at": ModelConfig(pretrained=str(tmp_path / "nope")),
        "a directory without state.pt, summary.json or best.json": ModelConfig(pretrained=str(tmp_path)),
        "for resnet50 only": ModelConfig(pretrained="imagenet"),
    }
    for expected, cfg in cases.items():
        with pytest.raises(ModelError, match=expected):
            build_model(cfg, 1 if "does not fit" in expected else 3, 12, 4)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="is not a weights-only torch file"):
        build_model(ModelConfig(pretrained=str(junk)), 3, 12, 4)


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_file_that_would_run_code_is_never_unpickled(tmp_path):
    marker, planted = tmp_path / "ran", tmp_path / "planted.pth"
    torch.save({"model": _Planted(marker)}, planted)
    with pytest.raises(ModelError, match="is not a weights-only torch file"):
        build_model(ModelConfig(pretrained=str(planted)), 3, 12, 4)
    assert not marker.exists()


def test_a_relative_pretrained_path_is_made_absolute_on_the_driver(tmp_path, monkeypatch):
    # Ray Train runs its workers in a directory of its own: a relative path would name nothing there.
    from trainers.config import load_run_config

    monkeypatch.chdir(tmp_path)
    for given, expected in (("runs/pretrain", str(tmp_path / "runs" / "pretrain")), ("imagenet", "imagenet"),
                            ("s3://bucket/runs/x", "s3://bucket/runs/x")):
        assert load_run_config(None, [f"model.pretrained={given}"]).model.pretrained == expected
