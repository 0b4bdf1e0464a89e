"""docker/Dockerfile without a Docker daemon: its instructions are parsed here and checked for
the promises its comments make: the base image's Ray inside setup.py's range and Python 3.11,
pinned dependencies inside setup.py's ranges, COPY sources that exist and reach the build
context, a .dockerignore that keeps out what .rayignore keeps out, no secrets, a non-root user."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to .rayignore

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
VARIANTS = ("gpu", "cpu")


# --------------------------------------------------------------------------- parsing

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):  # Docker drops these inside continuations too
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def _steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _arg_defaults(steps) -> dict[str, str]:
    """ARG NAME=default lines before FROM: what FROM may use."""
    defaults = {}
    for keyword, args in steps:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name] = value
    return defaults


def base_image(steps, **build_args: str) -> str:
    values = _arg_defaults(steps) | build_args
    (image,) = [args for keyword, args in steps if keyword == "FROM"]  # one stage
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], image)


def copy_sources(steps) -> list[str]:
    sources = []
    for keyword, args in steps:
        if keyword in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]  # the last word is the destination
    return sources


def _setup_call() -> dict:
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: k.value for k in call.keywords}


def _requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in ast.literal_eval(_setup_call()["install_requires"])]
    return {r.name.lower(): r for r in reqs}


def _constraints() -> dict[str, str]:
    lines = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    pins = [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
    assert all("==" in p for p in pins), f"every constraint is an exact pin: {pins}"
    return {name.lower(): version for name, version in (p.split("==") for p in pins)}


# --------------------------------------------------------------------------- .dockerignore semantics

def _docker_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: anchored at the context root, `**` any
    number of directories, `*` and `?` within one name."""
    out, p = "", pattern.strip("/")
    while p:
        if p.startswith("**/"):
            out, p = out + "(?:.*/)?", p[3:]
        elif p.startswith("**"):
            out, p = out + ".*", p[2:]
        elif p[0] == "*":
            out, p = out + "[^/]*", p[1:]
        elif p[0] == "?":
            out, p = out + "[^/]", p[1:]
        else:
            out, p = out + re.escape(p[0]), p[1:]
    return re.compile(out)


def docker_ignores(path: str, lines: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern that matches
    the path or one of its parent directories decides, `!` patterns letting it back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in lines:
        negated = line.startswith("!")
        regex = _docker_regex(line.lstrip("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def _patterns(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _probes(line: str) -> list[str]:
    """Paths a .rayignore line is about, at the top and inside a package."""
    name = line.strip("/").replace("*", "x")
    name = name + "/f" if line.endswith("/") else name
    return [name, f"cluster/{name}", f"search_spaces/sub/{name}"]


# --------------------------------------------------------------------------- the checks

def test_the_parser_joins_continuations_and_drops_comments():
    steps = instructions("# c\nARG A=1\nFROM x:${A}\nRUN a \\\n  # not a comment in Docker either\n    && b\n")
    assert steps[0] == ("ARG", "A=1") and base_image(steps) == "x:1"
    assert steps[2][0] == "RUN" and steps[2][1].endswith("&& b")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_base_is_rayprojects_image_with_setup_pys_ray_and_python(variant):
    image = base_image(_steps(), VARIANT=variant)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cpu)", image)
    assert match, f"pin the base to a Ray release, a Python and a platform: {image}"
    ray_version, python_minor, platform = match.groups()
    assert platform == variant
    ray_range = _requirements()["ray"].specifier
    assert Version(ray_version) in ray_range, f"{image}: Ray {ray_version} is outside setup.py's {ray_range}"
    python_range = SpecifierSet(ast.literal_eval(_setup_call()["python_requires"]))
    assert python_minor == "11" and Version(f"3.{python_minor}") in python_range
    assert _constraints()["ray"] == ray_version, "constraints.txt pins the base image's Ray"


def test_every_dependency_is_pinned_inside_setup_pys_range():
    pins, wanted = _constraints(), _requirements()
    assert sorted(wanted) == sorted(pins), "constraints.txt pins exactly setup.py's install_requires"
    outside = {n: v for n, v in pins.items() if Version(v) not in wanted[n].specifier}
    assert outside == {}, f"pins outside setup.py's ranges: {outside}"
    assert "-c /tmp/raysweep/docker/constraints.txt" in " ".join(a for k, a in _steps() if k == "RUN")


def test_every_copied_file_exists_and_reaches_the_build_context():
    sources = copy_sources(_steps())
    ignore = _patterns(".dockerignore")
    packages = [p.rstrip("*") for p in re.findall(r'"(\w+)\*"', ast.unparse(_setup_call()["packages"]))]
    assert set(packages) <= set(sources), "every package setup.py installs is copied"
    for source in sources:
        assert not re.match(r"https?://", source), f"no downloads through ADD: {source}"
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        files = [source] if (ROOT / source).is_file() else \
            [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py*") if "__pycache__" not in p.parts]
        assert files and not [f for f in files if docker_ignores(f, ignore)], f"{source} is cut by .dockerignore"


def test_dockerignore_keeps_out_what_rayignore_keeps_out():
    rayignore, dockerignore = _patterns(".rayignore"), _patterns(".dockerignore")
    ray_spec = PathSpec.from_lines("gitwildmatch", rayignore)
    kept_in = []
    for line in rayignore:
        probes = [p for p in _probes(line) if ray_spec.match_file(p)]
        assert probes, f"{line}: no probe path that Ray leaves out"  # the probes are about the line
        kept_in += [f"{p} ({line})" for p in probes if not docker_ignores(p, dockerignore)]
    assert kept_in == [], "in the image's build context but not in a job's working_dir"
    assert docker_ignores("cluster/__pycache__/cli.cpython-311.pyc", dockerignore)
    assert not docker_ignores("trainers/config.py", dockerignore)


def test_no_secrets_go_into_the_image():
    for keyword, args in _steps():
        if keyword in ("ENV", "ARG"):
            for name, _, value in (pair.partition("=") for pair in args.split()):
                secret = re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", name, re.I)
                assert not (secret and value), f"{keyword} {name}: no secrets in an image (pass them at run time)"
    for source in copy_sources(_steps()):
        assert not re.search(r"(^|/)\.(ray|aws|ssh|env)|auth_token|\.pem$|\.key$|^~|^/", source), source


def test_the_image_runs_as_a_non_root_user_and_keeps_rays_commands_usable():
    steps = _steps()
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"run as a non-root user: {users}"
    # Ray's cluster launcher runs `docker run ... IMAGE bash`, KubeRay sets its own command: an
    # ENTRYPOINT would sit in front of both. raysweep and ray are console scripts on PATH.
    assert "ENTRYPOINT" not in [k for k, _ in steps]
    assert "raysweep=cluster.cli:main" in ast.unparse(_setup_call()["entry_points"])
    assert [a for k, a in steps if k == "CMD"][-1].startswith('["raysweep"')
