"""The Hugging Face Hub read protocol: model info, file tree and resolve (issue 15, part 1).

Routes: ``/api/models/{repo}[/revision/{rev}]``, ``/api/models/{repo}/tree/{rev}[/{path}]`` and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}``.

Repos, revisions and commit ids come from ``weightstore.hub`` (the mapping table is its docstring).
File bytes never pass through this process: ``resolve`` answers 302 to a short-lived presigned S3
GET with the metadata the Hub's clients read from the redirect itself (``X-Repo-Commit``,
``X-Linked-Etag`` = the blob's sha256, ``X-Linked-Size``); the clients do not send the API key to the
store's host.

Errors are the project's (status from ``ERROR_TABLE``, same JSON body); ``HubRoute`` adds the Hub's
``X-Error-Code``/``X-Error-Message`` from ``HUB_ERROR_CODES``, the one table of those codes. The
router is included last (``app.ROUTERS``) and every route needs two repo-id segments followed by
``resolve`` (or the ``/api/models`` prefix), so it cannot shadow ``/v1``, ``/api/v1``, ``/admin`` or
``/healthz``: a path matched earlier never reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.routing import APIRoute

from weightstore import errors as e
from weightstore import hub
from weightstore.objectstore import blob_key

from ..deps import CtxDep, CurrentPrincipal, SessionDep
from ..errors import weightstore_error_handler

HUB_ERROR_CODES: tuple[tuple[type[e.WeightstoreError], str], ...] = (
    # most specific first; an error not listed goes out without X-Error-Code (401, 503, ...)
    (hub.RepoNotFound, "RepoNotFound"),
    (hub.RevisionNotFound, "RevisionNotFound"),
    (hub.EntryNotFound, "EntryNotFound"),
    (e.Forbidden, "GatedRepo"),  # a disabled tenant's key: huggingface_hub says "access restricted"
    (e.NotFound, "EntryNotFound"),
)
TREE_PAGE_SIZE = 1000
"""Entries per tree page (the Hub's own page size); more come through ``Link: <...>; rel="next"``."""


def hub_error_code(exc: e.WeightstoreError) -> str | None:
    return next((code for cls, code in HUB_ERROR_CODES if isinstance(exc, cls)), None)


class HubRoute(APIRoute):
    """Renders errors (including the key check in a dependency) through the project's handler, then
    adds the Hub's headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except e.WeightstoreError as exc:
                response = await weightstore_error_handler(request, exc)
                code = hub_error_code(exc)
                if code is not None:
                    response.headers["X-Error-Code"] = code
                response.headers["X-Error-Message"] = exc.message.encode("ascii", "replace").decode()[:500]
                commit = exc.details.get("commit")
                if isinstance(commit, str):
                    response.headers["X-Repo-Commit"] = commit  # lets the client cache "no such file"
                return response

        return route


router = APIRouter(tags=["hub"], route_class=HubRoute)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _lfs(f: hub.HubFile) -> dict[str, object]:
    return {"oid": f.sha256, "size": f.size_bytes, "pointerSize": len(hub.lfs_pointer(f.sha256, f.size_bytes))}


def _model_info(snap: hub.Snapshot) -> dict[str, object]:
    namespace = snap.repo_id.split("/")[0]
    return {
        "_id": snap.commit[:24],
        "id": snap.repo_id,
        "modelId": snap.repo_id,
        "author": namespace,
        "sha": snap.commit,
        "private": snap.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "library_name": "transformers",
        "lastModified": _iso(snap.last_modified),
        "createdAt": _iso(snap.last_modified),
        "siblings": [
            {
                "rfilename": f.path,
                "size": f.size_bytes,
                "blobId": hub.git_oid(f.sha256, f.size_bytes),
                "lfs": {"sha256": f.sha256, "size": f.size_bytes, "pointerSize": len(hub.lfs_pointer(f.sha256, f.size_bytes))},
            }
            for f in snap.files
        ],
        "usedStorage": sum(f.size_bytes for f in snap.files),
    }


def _snapshot(session: SessionDep, ctx: CtxDep, principal: CurrentPrincipal, namespace: str, name: str, rev: str) -> hub.Snapshot:
    return hub.snapshot(session, principal, f"{namespace}/{name}", rev, now=ctx.clock.now())


@router.get("/api/models/{namespace}/{name}", operation_id="hub_model_info")
def model_info(namespace: str, name: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> dict[str, object]:
    """The repo at ``main`` (``sha`` = its commit id, ``siblings`` = its files)."""
    return _model_info(_snapshot(session, ctx, principal, namespace, name, hub.MAIN))


@router.get("/api/models/{namespace}/{name}/revision/{revision:path}", operation_id="hub_model_info_revision")
def model_info_revision(
    namespace: str, name: str, revision: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep
) -> dict[str, object]:
    return _model_info(_snapshot(session, ctx, principal, namespace, name, revision))


def _tree_entries(snap: hub.Snapshot, path: str, *, recursive: bool, expand: bool) -> list[dict[str, object]]:
    prefix = f"{path}/" if path else ""
    files = [f for f in snap.files if f.path.startswith(prefix) or f.path == path]
    if path and not files:
        raise hub.EntryNotFound(f"{path!r} not found in {snap.repo_id}", commit=snap.commit)
    dirs: set[str] = set()
    out: list[dict[str, object]] = []
    for f in files:
        rel = f.path[len(prefix) :] if f.path != path else f.path.rsplit("/", 1)[-1]
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            if recursive or depth == 1:
                dirs.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entry: dict[str, object] = {
                "type": "file",
                "oid": hub.git_oid(f.sha256, f.size_bytes),
                "size": f.size_bytes,
                "path": f.path,
                "lfs": _lfs(f),
            }
            if expand:
                entry["lastCommit"] = {"id": snap.commit, "title": "weightstore checkpoint", "date": _iso(snap.last_modified)}
            out.append(entry)
    out += [{"type": "directory", "oid": hub.tree_oid(snap.commit, d), "size": 0, "path": d} for d in dirs]
    return sorted(out, key=lambda x: str(x["path"]))


@router.get("/api/models/{namespace}/{name}/tree/{rest:path}", operation_id="hub_list_tree")
def list_tree(
    namespace: str,
    name: str,
    rest: str,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    ctx: CtxDep,
    session: SessionDep,
    recursive: bool = False,
    expand: bool = False,
    limit: Annotated[int, Query(ge=1, le=TREE_PAGE_SIZE)] = TREE_PAGE_SIZE,
    cursor: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> list[dict[str, object]]:
    """Files and folders under ``path`` at ``rev``; a page of ``limit`` entries from ``cursor``, the
    next page linked GitHub-style (``Link: <...>; rel="next"``)."""
    revision, path = hub.split_revision_path(rest.rstrip("/"))
    snap = _snapshot(session, ctx, principal, namespace, name, revision)
    entries = _tree_entries(snap, path, recursive=recursive, expand=expand)
    page = entries[cursor : cursor + limit]
    if cursor + limit < len(entries):
        response.headers["Link"] = f'<{request.url.include_query_params(cursor=cursor + limit)}>; rel="next"'
    return page


@router.api_route(
    "/{namespace}/{name}/resolve/{rest:path}",
    methods=["GET", "HEAD"],
    operation_id="hub_resolve_file",
    status_code=302,
    responses={302: {"description": "Location: a presigned GET of the blob; X-Repo-Commit, X-Linked-Etag, X-Linked-Size"}},
)
def resolve_file(namespace: str, name: str, rest: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> Response:
    """302 to a presigned GET of the file's blob, with the Hub's metadata headers; no bytes here."""
    revision, path = hub.split_revision_path(rest)
    snap = _snapshot(session, ctx, principal, namespace, name, revision)
    try:
        f = hub.live_file(session, snap, path)
    except hub.EntryNotFound as exc:
        exc.details["commit"] = snap.commit
        raise
    url = ctx.store.presign_get(blob_key(f.sha256), ctx.settings.presign_ttl_seconds, filename=path.rsplit("/", 1)[-1])
    etag = f'"{f.sha256}"'
    headers = {
        "Location": url,
        "X-Repo-Commit": snap.commit,
        "X-Linked-Etag": etag,
        "ETag": etag,
        "X-Linked-Size": str(f.size_bytes),
        "Cache-Control": "private, no-store",
    }
    return Response(status_code=302, headers=headers)
