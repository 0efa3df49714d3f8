"""Migration 0005 moves the download flow's sessions, models and futures out of
``idempotency_record`` into their own tables, and its downgrade puts back exactly what it took."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa

from alembic import command
from weightstore import db

BEFORE = "0004_usage_day"
AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

# what the old code wrote: (tenant, key, operation, response)
OLD_RECORDS: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "acme",
        "tinker-session:s1",
        "tinker_session",
        {"state": "active", "user_metadata": {"a": 1}, "tags": ["x", "y"], "project_id": None},
    ),
    (
        "acme",
        "tinker-session:s2",
        "tinker_session",
        {"state": "finished", "user_metadata": None, "tags": [], "project_id": "p", "reason": "user"},
    ),
    (
        "acme",
        "tinker-model:s1:train:0",
        "tinker_model",
        {"source_checkpoint_id": "ckpt_1", "source_path": "tinker://r/weights/w", "session_id": "s1"},
    ),
    (
        "acme",
        "tinker-future:f1",
        "tinker_future",
        {"state": "done", "result": {"path": "tinker://r/weights/w", "type": "load_weights"}},
    ),
    (
        "acme",
        "tinker-future:f2",
        "tinker_future",
        {"state": "export", "job_id": "job_1", "model_id": "s1:train:0", "name": "out", "ttl_seconds": 7200},
    ),
    (
        "acme",
        "tinker-future:f3",
        "tinker_future",
        {"state": "export", "job_id": "job_2", "model_id": "m", "name": "o", "ttl_seconds": None},
    ),
    ("acme", "copy:k1", "copy_weights", {"tinker_path": "tinker://r/weights/w"}),
]

records = sa.table(
    "idempotency_record",
    sa.column("tenant_id"),
    sa.column("key"),
    sa.column("operation"),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("response", sa.JSON()),
)


def _records(engine: sa.Engine) -> list[tuple[str, str, str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(records.c.tenant_id, records.c.key, records.c.operation, records.c.response)).all()
    return sorted((r[0], r[1], r[2], r[3]) for r in rows)


def test_sessions_models_and_futures_move_to_their_tables_and_back(db_url: str) -> None:
    config = db.alembic_config(db_url)
    command.downgrade(config, BEFORE)
    engine = db.make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO tenant (id, name, created_at) VALUES ('acme', 'acme', :at)"), {"at": AT})
            conn.execute(
                sa.insert(records),
                [dict(tenant_id=t, key=k, operation=o, created_at=AT, response=r) for t, k, o, r in OLD_RECORDS],
            )

        command.upgrade(config, "heads")
        assert _records(engine) == [("acme", "copy:k1", "copy_weights", {"tinker_path": "tinker://r/weights/w"})]
        with engine.connect() as conn:
            sessions = conn.execute(
                sa.text("SELECT id, state, finish_reason, project_id, tags, user_metadata FROM tinker_session ORDER BY id")
            ).all()
            models = conn.execute(sa.text("SELECT id, session_id, source_checkpoint_id, source_path FROM tinker_model")).all()
            futures = conn.execute(
                sa.text("SELECT id, state, job_id, model_id, output_name, ttl_seconds, result FROM tinker_future ORDER BY id")
            ).all()
        as_json = sa.JSON().result_processor(engine.dialect, None)

        def j(value: Any) -> Any:
            return as_json(value) if as_json and isinstance(value, str) else value

        assert [(s[0], s[1], s[2], s[3], j(s[4]), j(s[5])) for s in sessions] == [
            ("s1", "active", None, None, ["x", "y"], {"a": 1}),
            ("s2", "finished", "user", "p", [], None),
        ]
        assert [tuple(m) for m in models] == [("s1:train:0", "s1", "ckpt_1", "tinker://r/weights/w")]
        assert [(*f[:6], j(f[6])) for f in futures] == [
            ("f1", "done", None, None, None, None, {"path": "tinker://r/weights/w", "type": "load_weights"}),
            ("f2", "export", "job_1", "s1:train:0", "out", 7200, None),
            ("f3", "export", "job_2", "m", "o", None, None),
        ]

        command.downgrade(config, BEFORE)
        assert _records(engine) == sorted(OLD_RECORDS)
    finally:
        engine.dispose()
        command.upgrade(config, "heads")


def test_sessions_live_in_their_table_and_a_finished_heartbeat_is_410(server, keys, ctx) -> None:  # type: ignore[no-untyped-def]
    api = f"{server.url}/api/v1"
    mine, theirs = {"X-API-Key": keys.trainer}, {"X-API-Key": keys.other_trainer}
    sid = httpx.post(f"{api}/create_session", json={"tags": ["t"], "user_metadata": {"k": "v"}}, headers=mine).json()[
        "session_id"
    ]
    with ctx.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT state, tags FROM tinker_session WHERE id = :id"), {"id": sid}).one()
        assert conn.execute(sa.text("SELECT count(*) FROM idempotency_record")).scalar() == 0
    assert row[0] == "active"

    beat = httpx.post(f"{api}/session_heartbeat", json={"session_id": sid}, headers=mine)
    assert beat.status_code == 200 and beat.json() == {"type": "session_heartbeat"}
    assert httpx.post(f"{api}/session_heartbeat", json={"session_id": sid}, headers=theirs).status_code == 404

    finished = httpx.post(f"{api}/sessions/{sid}/finish", json={"reason": {"type": "user"}}, headers=mine)
    assert finished.status_code == 200 and finished.json() == {"status": "finished"}
    gone = httpx.post(f"{api}/session_heartbeat", json={"session_id": sid}, headers=mine)
    # Tinker's contract: 410 stops the SDK's heartbeat loop; the body is the one error shape
    assert gone.status_code == 410 and "retry-after" not in gone.headers
    body = gone.json()
    assert body == {
        "code": "session_finished",
        "message": f"session {sid} has finished",
        "detail": f"session {sid} has finished",
        "request_id": body["request_id"],
    }
    assert httpx.post(f"{api}/retrieve_future", json={"request_id": "nope"}, headers=mine).json()["code"] == "not_found"
