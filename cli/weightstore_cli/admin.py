"""``weightstore admin bootstrap``: the one-shot job that prepares a deployment (catalog, bucket, first admin key).

It runs against the catalog and the store directly (no API key: it is how the first one is made):
migrations (locked, safe beside replicas), the bucket (the only place outside the embedded ``serve``
that creates one), the operator tenant and the first admin key. Idempotent: once an admin key exists
it creates nothing and prints nothing secret, unless ``--rotate``. The key is printed once on
stdout, or written to ``--key-file`` (mode 600), or taken from ``WEIGHTSTORE_INITIAL_ADMIN_KEY``.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from weightstore_cli.common import EXIT_USAGE, err, handle_errors

admin_app = typer.Typer(help="Deployment set-up, run against the catalog directly (no API key).", no_args_is_help=True)


def write_key_file(path: Path, key: str) -> None:
    """Write ``key`` to ``path`` with mode 600, atomically (a temporary file renamed over it), so a
    reader never sees a partial key and the key is never world-readable, not even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.chmod(tmp, 0o600)  # O_CREAT's mode is filtered by the umask; an existing tmp keeps its mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@admin_app.command("bootstrap")
def bootstrap_command(
    key_file: Path = typer.Option(None, "--key-file", help="Write the new admin key to PATH (mode 600) instead of stdout."),
    rotate: bool = typer.Option(False, "--rotate", help="Make a new bootstrap admin key even if one exists; revoke the old one."),
) -> None:
    """Migrate the catalog, create the bucket, the operator tenant and the first admin key (printed
    once, or written to --key-file). Run it once per deployment before the replicas; running it
    again creates nothing. With WEIGHTSTORE_INITIAL_ADMIN_KEY set, that key is installed instead."""
    from weightstore import bootstrap
    from weightstore.auth import OPERATOR_TENANT
    from weightstore.settings import Settings

    with handle_errors():
        settings = Settings()  # a malformed WEIGHTSTORE_INITIAL_ADMIN_KEY is one line, not a traceback
    if key_file is not None and settings.initial_admin_key is not None:
        err("error: --key-file with WEIGHTSTORE_INITIAL_ADMIN_KEY: the key is already in your secret store; give one of them")
        raise typer.Exit(EXIT_USAGE)
    with handle_errors():
        running = bootstrap.start(settings, migrate=True, create_bucket=True)
        try:
            ctx = running.ctx
            err(f"catalog migrated: {settings.resolved_database_url.split('@')[-1]}")
            err(f"bucket {settings.s3_bucket} ready at {ctx.settings.s3_endpoint_url}")
            write = (lambda key: write_key_file(key_file, key)) if key_file is not None else None
            result = bootstrap.bootstrap_admin_key(ctx, rotate=rotate, before_commit=write)
        finally:
            running.close()
    if result.key_id is None:
        err("an admin key exists already: nothing created (--rotate makes a new bootstrap key and revokes the old one)")
        return
    if result.api_key is None:
        err(f"installed admin key {result.key_id} for tenant {OPERATOR_TENANT} from WEIGHTSTORE_INITIAL_ADMIN_KEY")
    elif key_file is not None:
        err(f"created admin key {result.key_id} for tenant {OPERATOR_TENANT}, written to {key_file} (mode 600)")
    else:
        typer.echo(result.api_key)
        err(f"created admin key {result.key_id} for tenant {OPERATOR_TENANT} (shown once)")
    if result.revoked:
        err(f"revoked bootstrap key(s): {', '.join(result.revoked)}")


def register(app: typer.Typer) -> None:
    app.add_typer(admin_app, name="admin")
