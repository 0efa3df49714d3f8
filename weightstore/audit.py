"""Audit trail: who did what, appended in the same transaction as the change itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from weightstore.models import AuditEvent


def record(
    session: Session,
    *,
    at: datetime,
    action: str,
    tenant_id: str | None,
    key_id: str | None = None,
    target: str | None = None,
    request_id: str | None = None,
    **details: Any,
) -> None:
    session.add(
        AuditEvent(
            at=at,
            tenant_id=tenant_id,
            key_id=key_id,
            action=action,
            target=target,
            request_id=request_id,
            details=details or None,
        )
    )
