"""The images: built on the Ray image whose Ray equals the project's pin, and they install
the project with the same torch pair as the Makefile. (No Docker engine here, so the
Dockerfiles are parsed, not built.)"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"Dockerfile": "", "Dockerfile.gpu": "-gpu"}


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def pinned(requirements: list[str], name: str) -> str:
    for req in requirements:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


@pytest.fixture(scope="module")
def deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_instruction_parser_joins_continuations_and_drops_comments() -> None:
    parsed = instructions("# c\nFROM a:1\nRUN x \\\n && y\n\nENV A=1")
    assert parsed == [("FROM", "a:1"), ("RUN", "x  && y"), ("ENV", "A=1")]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_ray_version_equals_the_pinned_ray(name: str, deps: list[str]) -> None:
    (base,) = [arg for word, arg in instructions((ROOT / name).read_text()) if word == "FROM"]
    repo, _, tag = base.partition(":")
    assert repo == "rayproject/ray"
    m = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d)(\d+)(-gpu|-cpu)?", tag)
    assert m, f"unexpected Ray image tag {tag!r}"
    assert m.group(1) == pinned(deps, "ray")
    assert f"{m.group(2)}.{m.group(3)}" == "3.11"  # the project's Python (ruff target py311)
    assert (m.group(4) or "") in ({"-gpu"} if DOCKERFILES[name] else {"", "-cpu"})


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_installs_the_project_with_the_pinned_torch_pair(name: str, deps: list[str]) -> None:
    steps = instructions((ROOT / name).read_text())
    copied = {tok for word, arg in steps if word == "COPY" for tok in shlex.split(arg)[:-1] if not tok.startswith("--")}
    assert {"pyproject.toml", "reir"} <= copied
    run = " ".join(arg for word, arg in steps if word == "RUN")
    commands: list[list[str]] = [[]]
    for tok in shlex.split(run):
        commands.append([]) if tok == "&&" else commands[-1].append(tok)
    installs = [c[c.index("install") + 1 :] for c in commands if c[:2] == ["pip", "install"]]
    assert ["."] in [[a for a in args if not a.startswith("-")] for args in installs], "the project is not installed"
    torch_pair = {f"torch=={pinned(deps, 'torch')}", f"torchvision=={pinned(deps, 'torchvision')}"}
    assert any(torch_pair <= set(args) for args in installs)
    makefile = (ROOT / "Makefile").read_text()
    assert all(p in makefile for p in torch_pair), "Makefile and pyproject.toml disagree on the torch pair"
    # The image checks itself at build time: same Ray at run time as in the pin.
    assert f"ray.__version__ == '{pinned(deps, 'ray')}'" in run


def test_dockerignore_keeps_what_the_images_copy() -> None:
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!reir/"} <= set(rules)
