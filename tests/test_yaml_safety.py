"""Every YAML raysweep reads goes through one loader that refuses anchors/aliases (billion
laughs) and oversized files, and no error repeats a huge value back."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from cluster.connect import autoscaler_ceiling
from search_spaces.space import load_space
from trainers.config import load_run_config
from trainers.configtools import PROBLEM_CHARS, ConfigError
from trainers.yamlfile import MAX_YAML_BYTES

ROOT = Path(__file__).resolve().parents[1]

# 6 levels of 9 aliases under a real key: 9**6 = 531441 strings once walked (a message that
# repeats the value: ~4 MB). The one reported had 9 levels (387M); 6 keep a regression of
# this test quick to fail instead of eating the machine's memory.
LAUGHS = "\n".join(
    ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    + ["data: {name: *a6}", ""])


def test_a_billion_laughs_config_is_refused_at_its_first_anchor(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS)
    assert len(LAUGHS) < 400
    with pytest.raises(ConfigError) as err:
        load_run_config(str(bomb))
    [problem] = err.value.problems
    assert problem.startswith(f"--config {bomb}, line 1: YAML anchors and aliases are not allowed (found anchor &a0)")


def test_the_cli_refuses_a_bomb_with_exit_2_before_ray_starts(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS)
    assert main(["train", "--config", str(bomb), "--storage", str(tmp_path / "runs"), "--name", "b"]) == 2
    err = capsys.readouterr().err
    assert "anchors and aliases are not allowed" in err and len(err) < 500


def test_an_alias_alone_and_a_merge_key_are_refused_too(tmp_path):
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &b {lr: 0.1}\noptim:\n  <<: *b\n")
    space = tmp_path / "space.yaml"
    space.write_text("name: s\nparams:\n  optim.lr: {type: uniform, low: 0.1, high: *x}\n")
    with pytest.raises(ConfigError, match=r"merge.yaml, line 1: .*anchor &b"):
        load_run_config(str(merged))
    with pytest.raises(ConfigError, match=r"--space .*space.yaml, line 3: .*alias \*x"):
        load_space(str(space))
    with pytest.raises(ConfigError, match=r"--set 'optim.lr', line 1: .*anchor &a"):
        load_run_config(None, ["optim.lr=[&a 1, *a]"])


def test_the_cluster_bootstrap_config_goes_through_the_same_loader(tmp_path):
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text("available_node_types:\n  gpu: &g {resources: {GPU: 1}, max_workers: 2}\n  gpu2: *g\n")
    with pytest.raises(ConfigError, match="anchor &g"):
        autoscaler_ceiling(bootstrap)


def test_a_config_file_over_one_mebibyte_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: larger than 1048576 bytes"):
        load_run_config(str(big))


def test_errors_repeat_at_most_80_characters_of_a_value(tmp_path):
    long = tmp_path / "long.yaml"
    long.write_text("data:\n  name: [" + ", ".join(["lol"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(str(long))
    [problem] = err.value.problems
    assert problem.startswith("data.name: ['lol', ") and problem.endswith("is not a valid str")
    assert "…" in problem or "...]" in problem  # cut, or a few items shown (a container, bounded reprlib)
    assert len(problem) < 130
    # A message built elsewhere is still capped, its field and its fix kept.
    capped = ConfigError(["field.x: " + "v" * 10_000 + " must be positive; set field.x: 1"]).problems[0]
    assert len(capped) <= PROBLEM_CHARS and capped.startswith("field.x: vvv") and capped.endswith("set field.x: 1")


def test_every_shipped_yaml_loads_through_the_loader():
    for space in sorted((ROOT / "search_spaces").glob("*.yaml")):
        load_space(str(space))
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        load_run_config(str(example))
