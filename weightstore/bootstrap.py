"""Turn ``Settings`` into a running ``Context``: catalog migrated, object store reachable.

The embedded default (no ``WEIGHTSTORE_S3_ENDPOINT_URL``) starts SeaweedFS on loopback under
``data_dir/s3`` with credentials generated once and kept in ``data_dir/s3-credentials.json``
(mode 600), supervised by ``embedded.SeaweedFS`` (lock, stale-store reclaim, restart); a process
that finds a live owner shares its store. With an endpoint configured, nothing is started.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from weightstore import db
from weightstore.clock import Clock
from weightstore.context import Context
from weightstore.objectstore import store_from_settings
from weightstore.settings import Settings


def _embedded_credentials(data_dir: Path) -> tuple[str, str]:
    path = data_dir / "s3-credentials.json"
    if path.exists():
        creds = json.loads(path.read_text())
        return creds["access_key"], creds["secret_key"]
    data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "ws" + secrets.token_hex(8), secrets.token_urlsafe(30)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": access, "secret_key": secret}, f)
    return access, secret


def session_secret(settings: Settings) -> str:
    if settings.session_secret:
        return settings.session_secret.get_secret_value()
    path = settings.data_dir / "session-secret"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


EMBEDDED_MARKER = "s3-endpoint.json"
"""Written by the owner of the embedded store while it runs: ``{"endpoint_url", "pid"}``, for
tools outside this package. Which process owns the store is decided by the store's own lock
(``embedded.LOCK_FILE``), not by this file, so a stale marker left by a crash misleads nobody."""


@dataclass
class Running:
    ctx: Context
    stops: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self.stops:
            self.stops.pop()()


def start(settings: Settings, *, migrate: bool = True, clock: Clock | None = None) -> Running:
    """Build the context; start the embedded S3 store if no endpoint is configured."""
    stops: list[Callable[[], None]] = []
    if settings.s3_endpoint_url is None:
        access, secret = _embedded_credentials(settings.data_dir)
        from weightstore.embedded import SeaweedFS

        # Own the data dir's store (reclaiming one a crashed owner left running) or, when a live
        # process (`serve`, `gc`, `worker`) owns it, share it and stand by to take it over on the
        # same endpoint if that process goes: the store lives as long as any process using it.
        weed = SeaweedFS(
            settings.data_dir / "s3", access_key=access, secret_key=secret, endpoint_file=settings.data_dir / EMBEDDED_MARKER
        )
        weed.start(share=True)
        endpoint = weed.endpoint_url
        stops.append(weed.stop)
        settings = settings.model_copy(
            update={"s3_endpoint_url": endpoint, "s3_access_key_id": access, "s3_secret_access_key": SecretStr(secret)}
        )
    try:
        url = settings.resolved_database_url
        if migrate:
            db.upgrade(url)
        engine = db.make_engine(url)
        stops.append(engine.dispose)
        store = store_from_settings(settings)
        store.ensure_bucket()
    except BaseException:
        for stop in reversed(stops):
            stop()
        raise
    return Running(Context(settings=settings, engine=engine, store=store, clock=clock or Clock()), stops)
