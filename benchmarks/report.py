"""`python -m benchmarks.report [--readme]`: the latest clean full results (``results/NAME.json``)
as Markdown; ``--readme`` writes them into docs/benchmarks.md (the README's Performance
page) between the bench markers, so its figures always come from a run, never from typing."""

from __future__ import annotations

import json
import sys

from benchmarks import BENCHMARKS
from benchmarks.common import REPO, RESULTS_DIR

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TARGET = "docs/benchmarks.md"  # relative to REPO; README.md links it


def _cell(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "" if v is None else str(v)


def _table(headers, rows) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _commit(rec: dict) -> str:
    return rec.get("versions", {}).get("raysweep_commit") or "unknown"


def clean(rec: dict) -> bool:
    """A record of a committed tree: its commit is recorded without the ``+dirty`` mark
    (``benchmarks.common.versions``). Only these reach the page: a figure must be reproducible."""
    commit = rec.get("versions", {}).get("raysweep_commit") or ""
    return bool(commit) and not commit.endswith("+dirty")


def _latest(name: str) -> tuple[dict | None, list[dict]]:
    """The full run's clean record, else the --quick run's (its rows say so): a benchmark whose
    full run does not fit a session still shows what was measured, labelled. Also the records
    passed over for not being clean."""
    dirty = []
    for suffix in ("", ".quick"):
        if (path := RESULTS_DIR / f"{name}{suffix}.json").is_file():
            rec = json.loads(path.read_text())
            if clean(rec):
                return rec, dirty
            dirty.append(rec)
    return None, dirty


def markdown() -> str:
    found = {name: _latest(name) for name in BENCHMARKS}
    records = [r for r, _ in found.values() if r is not None]
    missing = [n for n, (r, _) in found.items() if r is None]
    dirty = [d for _, ds in found.values() for d in ds]
    out = _table(["benchmark", "mode", "value", "unit", "target", "met", "measured", "commit"],
                 [[r["name"], r.get("mode", "full"), _cell(r["value"], 4),  # 4 digits: 1.023 is not 1.02
                   r["unit"], r["target"], r["met"], r["date"][:16], _commit(r)] for r in records])
    if missing:
        out += ["", f"No run on record yet: {', '.join(missing)}."]
    if dirty:
        out += ["", "Left out, not from a committed tree: " + ", ".join(
            f"{d['name']} ({d.get('mode', 'full')}, commit {_commit(d)})"
            for d in dirty) + "."]
    for r in records:
        machine = r.get("machine", {})
        out += ["", f"### {r['name']}", "", f"`{r['command']}` ({machine.get('cpu', '')}, "
                f"{machine.get('cores', '?')} cores; {r['date'][:16]}; commit {_commit(r)})", ""]
        out += _table(r["table"]["headers"], r["table"]["rows"])
        out += [""] + [f"- {n}" for n in r.get("notes", [])]
    return "\n".join(out) + "\n"


def write_docs() -> None:
    path = REPO / TARGET
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{markdown()}{END}{tail}")


if __name__ == "__main__":
    write_docs() if "--readme" in sys.argv[1:] else print(markdown(), end="")
