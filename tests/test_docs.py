"""The README onboards and the pages under docs/ hold the rest: size, links, the tour's
commands and the configuration table are checked here, so they cannot drift silently."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

from trainers.config import TrainRunConfig

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (a link there is an example, not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(prose(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z]+:|#", t)]


def config_keys(cls=TrainRunConfig, prefix: str = "") -> dict[str, str]:
    """Every ``section.key`` of the run config with its default as the docs write it."""
    keys = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            keys |= config_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys[prefix + f.name] = default if isinstance(default, str) else json.dumps(default)
    return keys


def test_the_readme_is_an_onboarding_page_of_at_most_12_kib():
    size = len(README.read_bytes())
    assert size <= 12_288, f"README.md is {size} bytes; move detail into docs/ and link it"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.split("#")[0]).resolve() for t in relative_links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= 8
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_every_relative_link_points_at_a_file_that_exists():
    broken = [f"{page.relative_to(REPO)}: {t}" for page in [README, *sorted(DOCS.glob("*.md"))]
              for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert broken == []


def test_the_config_table_lists_every_key_with_its_default():
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", (DOCS / "train.md").read_text(), re.M)
    documented = dict(rows)
    assert len(documented) == len(rows), "a key is listed twice"
    assert documented == config_keys()


def test_the_tours_commands_parse_with_raysweeps_own_parser():
    from cluster.cli import build_parser

    tour = README.read_text().split("## A tour", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", tour, re.S)[0]
    commands = [shlex.split(line, comments=True)[1:] for line in block.splitlines()]
    assert len(commands) >= 6 and {c[0] for c in commands} >= {"train", "tune", "results", "predict", "submit"}
    for argv in commands:
        build_parser().parse_args(argv)  # SystemExit (exit 2) on a flag that does not exist
