"""The README's Python example, run as a user would (its own directory, an embedded Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import raysweep

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


def test_the_readmes_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README shows examples/api_quickstart.py's code verbatim, so this one run covers both."""
    example = (Path(__file__).resolve().parent.parent / "examples" / "api_quickstart.py").read_text()
    assert example.split('"""\n\n', 1)[1] == readme_python_example()
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_python_example(), "README.md (Python API)", "exec"), scope)
    run, epochs, best, report, model = (scope[k] for k in ("run", "epochs", "best", "report", "model"))
    assert run["status"] == "completed" and run["test_accuracy"] > 0.8
    assert epochs.num_rows == 3
    accuracy = epochs.column("val_accuracy").to_pylist()
    assert accuracy[0] == max(accuracy)  # best first
    assert best["status"] == "ok" and Path(best["checkpoint"]).exists()
    assert pq.read_table(tmp_path / "preds.parquet").num_rows == report["rows"] > 0
    assert Path(model).resolve() == (tmp_path / "model.pt").resolve() and model.stat().st_size > 0


def test_a_refused_request_raises_naming_the_field():
    with pytest.raises(ValueError, match=r"optim\.lr"):
        raysweep.train(overrides={"optim.lr": -1.0})
    with pytest.raises(ValueError, match="workers"):
        raysweep.train(workers=0)
    with pytest.raises(ValueError, match="unknown argument"):
        raysweep.tune("digits_cnn", trails=3)
