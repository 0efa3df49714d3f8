"""``weightstore`` command line: data on stdout, messages on stderr, ``--format json``, ``-y``.

Each sibling module that defines ``register(app: typer.Typer)`` adds its commands; this module only
assembles them (so collector, billing and export commands live beside their own code).
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(
    name="weightstore", no_args_is_help=True, add_completion=False, help="Checkpoint and weights storage for LoRA fine-tuning."
)


def _register_all() -> None:
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        module = importlib.import_module(f"{__name__}.{mod}")
        if hasattr(module, "register"):
            module.register(app)


_register_all()


def main() -> None:
    app()
