"""Assemble BENCHMARKS.md from the per-area results each benchmark writes to benchmarks/results/."""

from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ORDER = ["store", "gc", "billing", "export", "export_job", "load_verified", "cluster", "hub_snapshot", "dcp"]
HEADER = """# Benchmarks

Every figure below was measured side by side with its alternative in the same run, on the project's
standard machine (2 cores, 24 GiB, Debian 12, Python {python}), against real SeaweedFS and, where
stated, PostgreSQL. Reproduce with `make bench` (each `benchmarks/bench_*.py` and `hub_snapshot.py` writes
its section to `benchmarks/results/`; `load_verified.py`, `dcp_save_load.py` and `cluster_*.py` print their
tables, which go into `results/load_verified.md`, `dcp.md` and `cluster.md` with their reading; then
`python -m benchmarks.collect` rebuilds this file). No test asserts on timing. Numbers taken while
other work shared the 2 cores are marked as such in their section.
"""


def main() -> None:
    parts = [HEADER.format(python=platform.python_version())]
    results = ROOT / "results"
    names = [n for n in ORDER if (results / f"{n}.md").exists()]
    names += sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER)
    for name in names:
        parts.append((results / f"{name}.md").read_text().strip() + "\n")
    (ROOT.parent / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
