"""The README's module map is generated from the tree (tools/module_map.py) and must match it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.module_map import BEGIN_MARKER, END_MARKER, ModuleMapError, check, collect_rows, render_table, summary_of, write


def test_readme_module_map_matches_the_tree() -> None:
    diff = check()
    assert diff == "", f"README.md's module map is stale; run `python tools/module_map.py --write`:\n{diff}"


def _module(path: Path, docstring: str | None, body: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f'"""{docstring}"""\n' if docstring is not None else ""
    path.write_text(text + body, encoding="utf-8")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small repository: a core package with a private-module subpackage and a public-module subpackage."""
    core = tmp_path / "core"
    _module(core / "__init__.py", None)
    _module(core / "settings.py", "Settings: one validated class.\n\nDetails the map leaves out.")
    _module(core / "__main__.py", None, "print('shim')\n")
    _module(core / "_private.py", None)
    _module(core / "export" / "__init__.py", "Convert checkpoints, e.g. into adapters. Second sentence.")
    _module(core / "export" / "_merge.py", None)
    _module(core / "billing" / "__init__.py", "Billing: usage as a pure\n   function of the ledger.")
    _module(core / "billing" / "usage.py", "Usage per ``tenant`` | per run.")
    _module(core / "billing" / "_sql.py", None)
    _module(core / "routers" / "__init__.py", None)
    _module(core / "routers" / "native.py", "Native routes.")
    (tmp_path / "README.md").write_text(f"# Title\n\n{BEGIN_MARKER}\n| old |\n{END_MARKER}\n\nAfter.\n", encoding="utf-8")
    return tmp_path


def test_rows_follow_the_package_rules(tree: Path) -> None:
    rows = [(row.path, row.summary) for row in collect_rows(tree, roots=("core",))]

    assert rows == [
        ("core/billing/", "Billing: usage as a pure function of the ledger"),
        ("core/billing/usage.py", "Usage per ``tenant`` | per run"),
        ("core/export/", "Convert checkpoints, e.g. into adapters"),
        ("core/routers/native.py", "Native routes"),
        ("core/settings.py", "Settings: one validated class"),
    ]


def test_table_is_markdown_with_escaped_cells(tree: Path) -> None:
    table = render_table(collect_rows(tree, roots=("core",)))

    assert table.splitlines()[:2] == ["| module | owns |", "|---|---|"]
    assert "| `core/billing/usage.py` | Usage per `tenant` \\| per run |" in table.splitlines()


def test_a_module_without_docstring_is_an_error_naming_it(tree: Path) -> None:
    _module(tree / "core" / "runs.py", None, "RUNS = 1\n")
    _module(tree / "core" / "gc" / "__init__.py", None, "from core.gc._phases import run\n")
    _module(tree / "core" / "gc" / "_phases.py", "Phases.")

    with pytest.raises(ModuleMapError) as raised:
        collect_rows(tree, roots=("core",))

    assert str(raised.value).splitlines() == [
        "core/gc/__init__.py: no module docstring (the module map needs one)",
        "core/runs.py: no module docstring (the module map needs one)",
    ]


def test_write_replaces_only_the_table_and_check_then_passes(tree: Path) -> None:
    assert "+| `core/settings.py` | Settings: one validated class |" in check(tree, roots=("core",)).splitlines()

    assert write(tree, roots=("core",)) is True

    readme = (tree / "README.md").read_text(encoding="utf-8")
    table = render_table(collect_rows(tree, roots=("core",)))
    assert readme == f"# Title\n\n{BEGIN_MARKER}\n{table}{END_MARKER}\n\nAfter.\n"
    assert check(tree, roots=("core",)) == ""
    assert write(tree, roots=("core",)) is False


def test_missing_markers_are_an_error(tree: Path) -> None:
    (tree / "README.md").write_text("# Title\n\nNo map here.\n", encoding="utf-8")

    with pytest.raises(ModuleMapError, match="module-map:begin"):
        check(tree, roots=("core",))


@pytest.mark.parametrize(
    ("docstring", "summary"),
    [
        ("One line.", "One line"),
        ("Wrapped across\n    two lines. Then more.", "Wrapped across two lines"),
        ("Keeps ``pkg.mod`` and e.g. abbreviations. `Next` sentence.", "Keeps ``pkg.mod`` and e.g. abbreviations"),
        ("\nLeading newline.\n\nBody.", "Leading newline"),
    ],
)
def test_summary_is_the_first_sentence(docstring: str, summary: str) -> None:
    assert summary_of(docstring) == summary
