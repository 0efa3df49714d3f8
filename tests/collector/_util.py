"""Helpers for collector tests: save checkpoints through the real upload path, read them back."""

from __future__ import annotations

import hashlib

from weightstore import auth, checkpoints, runs, uploads
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.names import TinkerPath
from weightstore.objectstore import blob_key
from weightstore.uploads import DeclaredFile, UploadRequest
from weightstore_gc import verify


def principal(ctx: Context, key: str) -> Principal:
    with session_scope(ctx.engine) as s:
        return auth.authenticate(s, key, now=ctx.clock.now())


def new_run(ctx: Context, p: Principal) -> str:
    with session_scope(ctx.engine) as s:
        return runs.create_run(s, p, base_model="tiny", now=ctx.clock.now()).id


def declare(
    ctx: Context, p: Principal, run_id: str, name: str, files: dict[str, bytes], *, kind: str = "sampler", ttl: int | None = None
) -> uploads.UploadAnswer:
    req = UploadRequest(
        run_id, kind, name, [DeclaredFile(k, len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()], ttl_seconds=ttl
    )
    return uploads.declare(ctx, p, req)


def send(ctx: Context, p: Principal, ans: uploads.UploadAnswer, files: dict[str, bytes]) -> None:
    for f in ans.files:
        if f.transfer == "stream":
            uploads.receive_bytes(ctx, p, ans.upload_id, f.path, files[f.path])


def save(
    ctx: Context, p: Principal, run_id: str, name: str, files: dict[str, bytes], *, kind: str = "sampler", ttl: int | None = None
) -> str:
    ans = declare(ctx, p, run_id, name, files, kind=kind, ttl=ttl)
    send(ctx, p, ans, files)
    return uploads.commit(ctx, p, ans.upload_id).tinker_path


def download(ctx: Context, p: Principal, path: str) -> dict[str, bytes]:
    with session_scope(ctx.engine) as s:
        ckpt = checkpoints.get_for(s, p, TinkerPath.parse(path), now=ctx.clock.now())
        files = checkpoints.files_of(s, ckpt)
    return {f.path: ctx.store.read_bytes(blob_key(f.sha256)) for f in files}


def delete(ctx: Context, p: Principal, path: str) -> None:
    with session_scope(ctx.engine) as s:
        checkpoints.delete(s, p, TinkerPath.parse(path), now=ctx.clock.now())


def object_exists(ctx: Context, data: bytes) -> bool:
    return ctx.store.head(blob_key(hashlib.sha256(data).hexdigest())) is not None


def assert_verified(ctx: Context, *, collected: bool = False) -> None:
    rep = verify(ctx, hash_sample=5, expect_collected=collected, seed=0)
    assert rep.findings == [], [f.to_dict() for f in rep.findings]
