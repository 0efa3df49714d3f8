"""Admin UI sessions held by the server: sign-in starts one, every page checks it, sign-out and key revocation end it.

The browser's cookie carries a random 256-bit session id; the catalog keeps only its sha256 (like API
keys), so a copy of the catalog signs nobody in. A session is good while its row exists, is not
revoked, is inside its lifetime and idle limit, and its API key is still an unrevoked admin key; so
a copied cookie dies with sign-out, and every session of a key dies with the key
(``auth.revoke_key`` calls ``end_for_key`` in the same transaction).

CSRF tokens are HMACs under the deployment's session secret: a form's token is tied to the session
id (or, before sign-in, to the random nonce of a double-submit cookie), so nothing extra is stored
and a token from one session does not fit another. Catalog functions: the caller commits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col

from weightstore.errors import AuthenticationFailed
from weightstore.models import AdminUiSession, ApiKey, Role

SESSION_ID_BYTES = 32
"""256 random bits, like an API key: guessing one is hopeless, so a plain sha256 is enough to store."""
MAX_ID_LENGTH = 100
TOUCH_EVERY = timedelta(minutes=1)
"""``last_seen_at`` is written at most once a minute per session: most page views stay read-only."""
KEEP_ENDED = timedelta(days=1)
"""Ended or expired rows stay this long (to see recent sign-ins), then the next sign-in deletes them."""

SIGN_IN_FORM = "sign-in"
"""CSRF purpose of the sign-in form (tied to the double-submit cookie's nonce)."""
SESSION_FORM = "session-form"
"""CSRF purpose of the forms of a signed-in session (sign-out)."""


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def new_nonce() -> str:
    """A random value for a cookie (session id or sign-in nonce)."""
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def start(session: Session, *, key_id: str, now: datetime, lifetime: timedelta) -> str:
    """Start a session for ``key_id`` (already checked to be an admin key); returns the id for the
    cookie, which is never stored."""
    purge(session, now=now)
    session_id = new_nonce()
    session.add(
        AdminUiSession(id_hash=_hash(session_id), key_id=key_id, created_at=now, expires_at=now + lifetime, last_seen_at=now)
    )
    session.flush()
    return session_id


def check(session: Session, session_id: str | None, *, now: datetime, idle: timedelta) -> AdminUiSession:
    """The session's row if it may still open admin pages, else ``AuthenticationFailed`` (one message
    for every reason: missing, unknown, ended, expired, idle, key revoked or no longer admin)."""
    ended = AuthenticationFailed("the admin session has ended: sign in again")
    if not session_id or len(session_id) > MAX_ID_LENGTH:
        raise ended
    row = session.get(AdminUiSession, _hash(session_id))
    if row is None or row.revoked_at is not None or now >= row.expires_at or now - row.last_seen_at >= idle:
        raise ended
    key = session.get(ApiKey, row.key_id)
    if key is None or key.revoked_at is not None or key.role != Role.admin.value:
        raise ended
    if now - row.last_seen_at >= TOUCH_EVERY:
        row.last_seen_at = now
        session.add(row)
    return row


def end(session: Session, session_id: str | None, *, now: datetime) -> bool:
    """End one session (sign-out). True if a live session was ended."""
    if not session_id or len(session_id) > MAX_ID_LENGTH:
        return False
    row = session.get(AdminUiSession, _hash(session_id))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = now
    session.add(row)
    return True


def end_for_key(session: Session, key_id: str, *, now: datetime) -> int:
    """End every live session signed in with ``key_id`` (its key is being revoked)."""
    result = session.execute(
        sa.update(AdminUiSession)
        .where(col(AdminUiSession.key_id) == key_id, col(AdminUiSession.revoked_at).is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # DML result is a CursorResult


def purge(session: Session, *, now: datetime) -> int:
    """Delete rows that ended or expired more than ``KEEP_ENDED`` ago."""
    cutoff = now - KEEP_ENDED
    result = session.execute(
        sa.delete(AdminUiSession).where(sa.or_(col(AdminUiSession.expires_at) < cutoff, col(AdminUiSession.revoked_at) < cutoff))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # DML result is a CursorResult


def csrf_token(secret: str, purpose: str, bound_to: str) -> str:
    """The CSRF token for a form of ``purpose`` bound to a session id or sign-in nonce."""
    return hmac.new(secret.encode(), f"{purpose}\0{bound_to}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: str, purpose: str, bound_to: str | None, token: str | None) -> bool:
    """Constant-time check of a posted CSRF token; a missing binding or token never passes."""
    if not bound_to or not token or len(bound_to) > MAX_ID_LENGTH:
        return False
    return hmac.compare_digest(csrf_token(secret, purpose, bound_to), token)
