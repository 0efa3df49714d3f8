"""The admin audit listing of the Tinker surface (``/api/v1/audit``).

Audit events of all tenants grouped by Tinker's event types. Catalog function."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore.billing.units import day_after
from weightstore.errors import InvalidRequest
from weightstore.models import AuditEvent

AUDIT_EVENT_PREFIXES = {
    "checkpoints": ("checkpoint.",),
    "projects": ("project.",),
    "teams": ("team.",),
    "organizations": ("organization.", "tenant.", "key."),
}
"""Tinker's ``event_type`` filter -> the prefixes of our ``audit_event.action`` it selects."""


def audit_entries(
    session: Session, *, event_type: str = "all", day: datetime | None = None, limit: int = 1000
) -> list[AuditEvent]:
    """Audit events (all tenants: admin only), newest first, optionally for one UTC day."""
    if event_type != "all" and event_type not in AUDIT_EVENT_PREFIXES:
        raise InvalidRequest(f"event_type must be one of all, {', '.join(AUDIT_EVENT_PREFIXES)}")
    q = select(AuditEvent)
    if event_type != "all":
        q = q.where(sa.or_(*[col(AuditEvent.action).startswith(p) for p in AUDIT_EVENT_PREFIXES[event_type]]))
    if day is not None:
        q = q.where(col(AuditEvent.at) >= day, col(AuditEvent.at) < day_after(day))  # 9999-12-31 has no next day
    return list(session.exec(q.order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc()).limit(limit)).all())
