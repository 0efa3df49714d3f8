"""``weightstore`` command line: data on stdout, messages on stderr, ``--format json``, ``-y``.

The CLI is the outermost layer: it may import the core (``weightstore``), the API app
(``weightstore_api``, for ``serve``) and the collector (``weightstore_gc``); nothing imports it.
Each command module below defines ``register(app)``; this list is the whole command surface.
"""

from __future__ import annotations

import typer

from weightstore_cli import admin, billing, core, doctor, exports, gc, retention, tenants, trash

app = typer.Typer(
    name="weightstore", no_args_is_help=True, add_completion=False, help="Checkpoint and weights storage for LoRA fine-tuning."
)

# registration order = order in `weightstore --help`
COMMAND_MODULES = (core, admin, tenants, trash, retention, exports, gc, billing, doctor)
for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    app()
