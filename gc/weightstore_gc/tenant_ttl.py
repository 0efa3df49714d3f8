"""Per-tenant default TTL per kind (applied by the upload declare when the caller sends no ttl)."""

from __future__ import annotations

from sqlmodel import Session, select

from weightstore.errors import InvalidTTL, NotFound
from weightstore.models import Tenant
from weightstore.settings import Settings


def _check(settings: Settings, value: int | None) -> int | None:
    if value is None or value == 0:
        return None
    if not settings.ttl_min_seconds <= value <= settings.ttl_max_seconds:
        raise InvalidTTL(f"default ttl must be {settings.ttl_min_seconds}..{settings.ttl_max_seconds} s (0 removes it)")
    return value


def set_default_ttl(
    session: Session, tenant: str, *, settings: Settings, training: int | None = None, sampler: int | None = None
) -> Tenant:
    """``None`` leaves a kind unchanged; ``0`` removes its default."""
    row = session.get(Tenant, tenant) or session.exec(select(Tenant).where(Tenant.name == tenant)).first()
    if row is None:
        raise NotFound(f"tenant {tenant} not found")
    if training is not None:
        row.default_ttl_training_seconds = _check(settings, training)
    if sampler is not None:
        row.default_ttl_sampler_seconds = _check(settings, sampler)
    session.add(row)
    return row
