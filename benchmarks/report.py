"""`python -m benchmarks.report [--readme]`: the latest full results (``results/NAME.json``)
as Markdown; ``--readme`` writes them into README.md between the bench markers, so the
README's figures always come from a run, never from typing."""

from __future__ import annotations

import json
import sys

from benchmarks import BENCHMARKS
from benchmarks.common import REPO, RESULTS_DIR

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _table(headers, rows) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def markdown() -> str:
    records = [json.loads(p.read_text()) for name in BENCHMARKS if (p := RESULTS_DIR / f"{name}.json").is_file()]
    missing = [n for n in BENCHMARKS if not (RESULTS_DIR / f"{n}.json").is_file()]
    out = _table(["benchmark", "value", "unit", "target", "met", "measured"],
                 [[r["name"], r["value"], r["unit"], r["target"], r["met"], r["date"][:16]] for r in records])
    if missing:
        out += ["", f"No full run on record yet: {', '.join(missing)}."]
    for r in records:
        machine = r.get("machine", {})
        out += ["", f"### {r['name']}", "", f"`{r['command']}` ({machine.get('cpu', '')}, "
                f"{machine.get('cores', '?')} cores; {r['date'][:16]})", ""]
        out += _table(r["table"]["headers"], r["table"]["rows"])
        out += [""] + [f"- {n}" for n in r.get("notes", [])]
    return "\n".join(out) + "\n"


def write_readme() -> None:
    path = REPO / "README.md"
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{markdown()}{END}{tail}")


if __name__ == "__main__":
    write_readme() if "--readme" in sys.argv[1:] else print(markdown(), end="")
