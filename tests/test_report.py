"""The search report of one real small search (digits_cnn, 3 trials x 2 epochs), read in a
real headless Chromium, rebuilt by `raysweep report` (also from S3), and the study's
journal served by optuna-dashboard."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.cli import main

TRIALS = 3
FIGURES = 6  # history, importance, parallel coordinates, slices, learning curves, confusion matrix
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory) -> Path:
    """One real search for every test here: the cheapest that has curves and importance."""
    storage = tmp_path_factory.mktemp("report")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["tune", "--storage", str(storage), "--name", "s", "--space", "digits_cnn", "--trials",
                     str(TRIALS), "--max-epochs", "2", "--scheduler", "none", "--seed", "3"])
    (storage / "stdout.txt").write_text(out.getvalue())
    assert code == 0, out.getvalue()[-3000:]
    return storage / "s"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (.ci/run installs it where missing). Skipped without it, except in
    CI, where a missing browser must not pass as a skipped test."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "chromium is not installed (as root: apt-get install -y chromium; .ci/run does this)")
    return path


def run_chromium(chromium: str, page: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page``; its stderr carries the page's console (CONSOLE lines)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=10000", *flags, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=page.parent)


def table_rows(page: str) -> int:
    """Rows of the trials table (the header row too)."""
    return page.split('<table id="trials">', 1)[1].split("</table>", 1)[0].count("<tr")


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_search_ends_with_a_final_report_and_the_best_trials_confusion_matrix(search):
    best = json.loads((search / "best.json").read_text())
    cm = best["test_confusion_matrix"]
    assert len(cm) == 10 and all(len(row) == 10 for row in cm) and best["test_classes"] == [str(i) for i in range(10)]
    total = sum(map(sum, cm))
    assert sum(cm[i][i] for i in range(10)) / total == pytest.approx(best["test_accuracy"])
    page = (search / "report.html").read_text()
    assert "http-equiv" not in page  # the final version no longer reloads itself
    assert table_rows(page) == TRIALS + 1 and f"best: {best['trial_id']}" in page
    printed = (search.parent / "stdout.txt").read_text().splitlines()
    assert printed[-2:] == [f"report      {search / 'report.html'}", f"next        raysweep results {search}"]


def test_the_report_in_headless_chromium(search, chromium, tmp_path):
    page = search / "report.html"
    dom = run_chromium(chromium, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_lines(dom.stderr) == []  # no errors (and nothing else) on the console
    assert table_rows(dom.stdout) == TRIALS + 1  # the header row and one row per trial
    plots = dom.stdout.split('class="plotly-graph-div')[1:]
    assert len(plots) == FIGURES
    for plot in plots:  # drawn by plotly.js in the browser: an SVG with at least one trace
        assert 'class="main-svg"' in plot and re.search(r'class="(trace |hm")', plot), plot[:300]
    shot = tmp_path / "report.png"
    run_chromium(chromium, page, f"--screenshot={shot}", "--window-size=1300,4200")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 50_000
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 200  # plots, not a blank page
    # The console check can fail: a page with a script error is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefined_function();</script></body></html>")
    assert "undefined_function" in "".join(console_lines(run_chromium(chromium, broken, "--dump-dom").stderr))


def test_the_report_command_rebuilds_it_and_opens_it_in_a_browser(search, tmp_path):
    (search / "report.html").unlink()
    browser = tmp_path / "browser.sh"  # webbrowser runs $BROWSER with the page's URL
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {tmp_path / 'opened'}\n")
    browser.chmod(0o755)
    env = {**os.environ, "BROWSER": str(browser), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "cluster", "report", str(search), "--open"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"report      {search / 'report.html'}" in out.stdout
    assert table_rows((search / "report.html").read_text()) == TRIALS + 1
    for _ in range(50):  # the browser is started, not waited for
        if (tmp_path / "opened").exists():
            break
        time.sleep(0.1)
    assert (tmp_path / "opened").read_text().strip() == (search / "report.html").as_uri()


def test_the_report_command_reads_and_writes_s3(search, s3_server, capsys):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs")
    s3 = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http")
    for name in ("trials.parquet", "epochs.parquet", "best.json"):
        with s3.open_output_stream(f"runs/exp/{name}") as f:
            f.write((search / name).read_bytes())
    assert main(["report", "s3://runs/exp", "--open"]) == 0
    out, err = capsys.readouterr()
    assert "report      s3://runs/exp/report.html" in out and "is remote" in err
    with s3.open_input_stream("runs/exp/report.html") as f:
        assert table_rows(f.read().decode()) == TRIALS + 1


def test_a_directory_without_a_search_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no trials.parquet" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_optuna_dashboard_shows_the_searchs_journal(search):
    """docs/tune.md: `optuna-dashboard <experiment>/optuna.journal` shows the study."""
    exe = shutil.which("optuna-dashboard", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert exe, "optuna-dashboard is not installed: pip install -e '.[dev]'"
    port = _free_port()
    proc = subprocess.Popen([exe, str(search / "optuna.journal"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base, deadline, studies = f"http://127.0.0.1:{port}", time.time() + 60, None
        while studies is None and time.time() < deadline and proc.poll() is None:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no answer"
        assert [s["study_name"] for s in studies] == ["s"]
        detail = _get(f"{base}/api/studies/{studies[0]['study_id']}?after=0")
        assert len(detail["trials"]) == TRIALS and {t["state"] for t in detail["trials"]} == {"Complete"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
