"""The Hugging Face Hub read protocol: model info, file tree and resolve (issue 15, part 1).

Routes: ``/api/models/{repo}[/revision/{rev}]``, ``/api/models/{repo}/tree/{rev}[/{path}]`` and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}``.

Repos, revisions and commit ids come from ``weightstore.hub`` (the mapping table is its docstring).
File bytes never pass through this process: ``resolve`` answers 302 to a short-lived presigned S3
GET with the metadata the Hub's clients read from the redirect itself (``X-Repo-Commit``,
``X-Linked-Etag`` = the blob's sha256, ``X-Linked-Size``); the clients do not send the API key to the
store's host.

Write routes (issue 15, part 2; ``weightstore.hubwrite``): ``POST /api/repos/create``,
``.../preupload/{rev}``, ``/{repo}.git/info/lfs/objects/batch``, the multipart completion
``/{repo}.git/info/lfs/complete/{carrier}/{oid}`` (authorised by the token in its URL: the Hub's
client sends no key there) and the NDJSON ``.../commit/{rev}``; ``create_pr`` is refused (400).

Errors are the project's (status from ``ERROR_TABLE``, same JSON body); ``HubRoute`` adds the Hub's
``X-Error-Code``/``X-Error-Message`` from ``HUB_ERROR_CODES``, the one table of those codes. The
router is included last (``app.ROUTERS``) and every route needs two repo-id segments followed by
``resolve`` (or the ``/api/models`` prefix), so it cannot shadow ``/v1``, ``/api/v1``, ``/admin`` or
``/healthz``: a path matched earlier never reaches it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from weightstore import errors as e
from weightstore import formats, hub, hubwrite
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.objectstore import blob_key

from ..deps import CtxDep, CurrentPrincipal, SessionDep, get_ctx, get_principal, sent_key
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


def header_text(text: str, limit: int = 500) -> str:
    """``text`` as an HTTP header value: printable ASCII only, no surrounding spaces. Error messages
    echo what the client sent (paths, revisions), and a control character in a header is not a bad
    request but a response the server cannot send: the connection dropped, read as a 5xx."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit]).strip()


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
                response.headers["X-Error-Message"] = header_text(exc.message)
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


# --- write side (issue 15, part 2; the mapping is weightstore.hubwrite's docstring) --------------------------


async def _json_body(request: Request) -> Any:
    """A write route's JSON body, through the one parser (``formats.parse_json``) whatever its content type."""
    raw = await request.body()
    return formats.parse_json(raw, max_bytes=get_ctx(request).settings.max_json_body_bytes, name="request body")


def _create_repo(ctx: Context, principal: Principal, org: str | None, name: str) -> str:
    with session_scope(ctx.engine) as session:
        return hubwrite.create_repo(session, principal, namespace=org, name=name, now=ctx.clock.now())


def _preupload(
    ctx: Context, principal: Principal, repo_id: str, revision: str, files: list[dict[str, Any]]
) -> list[dict[str, object]]:
    with session_scope(ctx.engine) as session:
        return hubwrite.preupload(session, principal, repo_id, revision, files, now=ctx.clock.now())


def _refuse_pull_request(request: Request) -> None:
    """``create_pr=True`` (preupload and commit carry ``?create_pr=1``): refused before any byte moves."""
    if request.query_params.get("create_pr") not in (None, "", "0", "false", "False"):
        raise e.InvalidRequest("pull requests are not supported: push to main (create_pr=False)")


@router.post("/api/repos/create", operation_id="hub_create_repo")
async def create_repo(request: Request, principal: CurrentPrincipal, ctx: CtxDep) -> dict[str, object]:
    """``HfApi.create_repo``: the run ``{tenant}:{name}``; an existing repo of the caller's answers as created."""
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise e.InvalidRequest("create repo: 'name' is required")
    org = body.get("organization")
    if body.get("type") not in (None, "model"):
        raise e.InvalidRequest("only model repos can be created here")
    repo_id = await run_in_threadpool(_create_repo, ctx, principal, org if isinstance(org, str) else None, body["name"])
    return {"url": f"{str(request.base_url).rstrip('/')}/{repo_id}", "name": repo_id, "id": repo_id}


@router.post("/api/models/{namespace}/{name}/preupload/{revision:path}", operation_id="hub_preupload")
async def preupload(
    namespace: str, name: str, revision: str, request: Request, principal: CurrentPrincipal, ctx: CtxDep
) -> dict[str, object]:
    """Upload mode per file (``lfs`` for every non-empty file) and the sha256 ``main`` holds at each path."""
    _refuse_pull_request(request)
    body = await _json_body(request)
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise e.InvalidRequest("preupload: 'files' must be a list of objects")
    out = await run_in_threadpool(_preupload, ctx, principal, f"{namespace}/{name}", revision, files)
    return {"files": out}


@router.post("/{namespace}/{name}.git/info/lfs/objects/batch", operation_id="hub_lfs_batch")
async def lfs_batch(namespace: str, name: str, request: Request, principal: CurrentPrincipal, ctx: CtxDep) -> Response:
    """Git LFS batch: held objects without actions, the rest a presigned PUT (``basic``) or, above
    one PUT, presigned parts and a completion URL (the Hub's ``multipart``)."""
    body = await _json_body(request)
    if not isinstance(body, dict) or body.get("operation") != "upload" or not isinstance(body.get("objects"), list):
        raise e.InvalidRequest("lfs batch: only operation 'upload' with a list of objects is served")
    transfers = body.get("transfers") or ["basic"]
    if not isinstance(transfers, list) or not all(isinstance(t, str) for t in transfers):
        raise e.InvalidRequest("lfs batch: transfers must be a list of names")
    if "basic" not in transfers:
        raise e.InvalidRequest("lfs batch: only the 'basic' and 'multipart' transfers are offered")
    objects = [o for o in body["objects"] if isinstance(o, dict)]
    limit = hubwrite.lfs_put_limit(ctx.settings)
    if "multipart" not in transfers and any(isinstance(o.get("size"), int) and o["size"] > limit for o in objects):
        raise e.InvalidRequest(f"lfs batch: objects over {limit} bytes need the 'multipart' transfer")
    base_url = ctx.settings.public_url or str(request.base_url)
    answers = await run_in_threadpool(
        functools.partial(hubwrite.lfs_batch, base_url=base_url), ctx, principal, f"{namespace}/{name}", objects
    )
    multipart = any(_is_multipart(a) for a in answers)
    payload = {"transfer": "multipart" if multipart else "basic", "objects": answers, "hash_algo": "sha256"}
    return Response(json.dumps(payload), media_type="application/vnd.git-lfs+json")


def _is_multipart(answer: dict[str, object]) -> bool:
    """An LFS batch answer entry carrying the Hub's multipart upload action (``header.chunk_size``)."""
    actions = answer.get("actions")
    upload = actions.get("upload") if isinstance(actions, dict) else None
    header = upload.get("header") if isinstance(upload, dict) else None
    return isinstance(header, dict) and "chunk_size" in header


@router.post("/{namespace}/{name}.git/info/lfs/complete/{carrier_id}/{oid}", operation_id="hub_lfs_complete_multipart")
async def lfs_complete_multipart(
    namespace: str, name: str, carrier_id: str, oid: str, token: str, request: Request, ctx: CtxDep
) -> dict[str, object]:
    """Completion of the Hub's multipart transfer (the batch answer's ``href``). The Hub's client sends
    no token here: the URL's ``token`` is the capability (``hubwrite.complete_multipart``); a key sent
    anyway must belong to the tenant that pushed."""
    key = sent_key(request)
    principal = get_principal(request, ctx, key) if key else None
    body = await _json_body(request)
    await run_in_threadpool(
        functools.partial(hubwrite.complete_multipart, principal=principal),
        ctx,
        f"{namespace}/{name}",
        carrier_id,
        oid,
        token,
        body,
    )
    return {"success": True, "oid": oid}


@router.post("/api/models/{namespace}/{name}/commit/{revision:path}", operation_id="hub_commit")
async def commit(
    namespace: str, name: str, revision: str, request: Request, principal: CurrentPrincipal, ctx: CtxDep
) -> dict[str, object]:
    """The NDJSON commit: one checkpoint per ``SEG/NAME`` folder, each through the native upload protocol."""
    _refuse_pull_request(request)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > hubwrite.INLINE_MAX_BYTES:
            raise e.InvalidRequest(f"a commit body may hold at most {hubwrite.INLINE_MAX_BYTES} bytes")
    repo_id = f"{namespace}/{name}"
    ans = await run_in_threadpool(hubwrite.commit, ctx, principal, repo_id, revision, bytes(body))
    return {
        "success": True,
        "commitOid": ans.commit,
        "commitUrl": f"{str(request.base_url).rstrip('/')}/{repo_id}/commit/{ans.commit}",
        "hookOutput": "",
        "checkpoints": ans.checkpoints,
    }


@router.post("/api/validate-yaml", operation_id="hub_validate_yaml")
def validate_yaml(principal: CurrentPrincipal) -> dict[str, list[object]]:
    """The client checks a pushed README.md's card metadata here first; weightstore keeps READMEs as
    plain files, so any metadata is accepted."""
    return {"errors": [], "warnings": []}
