"""FastAPI dependencies: the process context, a catalog session, the authenticated principal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader
from sqlmodel import Session

from weightstore import auth
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="tml-... API key")


def get_ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


CtxDep = Annotated[Context, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    with session_scope(ctx.engine) as session:
        yield session


# scope="function": the transaction commits when the endpoint returns, *before* the response is
# sent — with the default scope a client could read stale state right after a 204.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def sent_key(request: Request) -> str | None:
    """The API key the request carries, if any: ``X-API-Key`` or ``Authorization: Bearer``."""
    return request.headers.get("x-api-key") or _bearer(request)


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


def get_principal(request: Request, ctx: CtxDep, key: Annotated[str | None, Security(api_key_header)] = None) -> Principal:
    key = key or _bearer(request)
    with session_scope(ctx.engine) as session:
        principal = auth.authenticate(session, key, now=ctx.clock.now())
    request.state.tenant_id = principal.tenant_id
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def get_writer(principal: CurrentPrincipal) -> Principal:
    principal.require_write()
    return principal


def get_admin(principal: CurrentPrincipal) -> Principal:
    principal.require_admin()
    return principal


WriterPrincipal = Annotated[Principal, Depends(get_writer)]
AdminPrincipal = Annotated[Principal, Depends(get_admin)]

# Paging bounds shared by every list endpoint. An unbounded offset overflows SQLite's 64-bit
# INTEGER (a 500 instead of a 400); a billion rows is far past any real listing.
MAX_OFFSET = 1_000_000_000
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip")]
