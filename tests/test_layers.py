"""The arrows between layers, checked from the source (AST): no import may point outwards.

    weightstore_cli  ─►  weightstore_api  ─►  weightstore (core)
                     └►  weightstore_gc   ─►  weightstore (core)

- core (``weightstore/``) imports no web framework, server or scheduler, no outer layer, and
  nothing that exists only for tests or benchmarks;
- the API imports the core and itself, never the collector or the CLI;
- the collector imports the core and itself, never the API, the CLI or a web framework;
- nothing but the CLI is outermost: no layer imports ``weightstore_cli``.

Every ``import`` statement counts, including those inside functions and ``TYPE_CHECKING`` blocks.
Imports through ``importlib`` with a computed name are not seen; the code base uses none.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEB = {"fastapi", "starlette", "uvicorn"}
OUTER = {"weightstore_api", "weightstore_gc", "weightstore_cli"}
TEST_TOOLING = {"tests", "benchmarks"}


def _dev_only_packages() -> set[str]:
    """Import names of the ``dev`` extra (test and lint tools: never needed by the product)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    return {re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].replace("-", "_").lower() for req in extras}


@dataclass(frozen=True)
class Layer:
    name: str
    root: Path
    """The package directory."""
    forbidden: frozenset[str]
    """Top-level import names this layer must not use."""


def layers() -> list[Layer]:
    return [
        Layer("core", REPO / "weightstore", frozenset(WEB | {"apscheduler"} | OUTER | TEST_TOOLING | _dev_only_packages())),
        Layer("api", REPO / "api" / "weightstore_api", frozenset({"weightstore_gc", "weightstore_cli"} | TEST_TOOLING)),
        Layer("gc", REPO / "gc" / "weightstore_gc", frozenset(WEB | {"weightstore_api", "weightstore_cli"} | TEST_TOOLING)),
    ]


def imported_top_levels(source: str) -> list[tuple[int, str]]:
    """(line, top-level module name) of every absolute import in ``source``. Relative imports stay
    inside their own package, so they can never cross a layer."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return sorted(found)


def violations(layer: Layer) -> list[str]:
    out: list[str] = []
    for path in sorted(layer.root.rglob("*.py")):
        for line, name in imported_top_levels(path.read_text()):
            if name in layer.forbidden:
                where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                out.append(f"{where}:{line}: {layer.name} imports {name}")
    return out


@pytest.mark.parametrize("layer", layers(), ids=lambda layer: layer.name)
def test_no_import_points_outwards(layer: Layer) -> None:
    assert layer.root.is_dir()
    assert list(layer.root.rglob("*.py")), f"no modules under {layer.root}"
    assert violations(layer) == []


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A violation in any import form is reported (so an empty list above means something)."""
    (tmp_path / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import os, weightstore_gc.runner\n"
        "from weightstore_api.app import create_app\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from fastapi import FastAPI\n"
        "def later() -> None:\n"
        "    import tests.helpers\n"
    )
    core = Layer("core", tmp_path, next(layer for layer in layers() if layer.name == "core").forbidden)
    assert [v.split(": ", 1)[1] for v in violations(core)] == [
        "core imports weightstore_gc",
        "core imports weightstore_api",
        "core imports fastapi",
        "core imports tests",
    ]


def test_dev_only_packages_are_known() -> None:
    assert {"pytest", "hypothesis", "schemathesis", "tinker"} <= _dev_only_packages()
