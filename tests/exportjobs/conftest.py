from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from weightstore import auth, basemodels, runs, uploads
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.names import TinkerPath

from .builders import adapter_files, build_base

BASE = "tiny-llama"


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("base") / BASE)


def principal_for(ctx: Context, key: str) -> Principal:
    with session_scope(ctx.engine) as s:
        return auth.authenticate(s, key, now=ctx.clock.now())


def save_adapter(ctx: Context, who: Principal, run_id: str, name: str, seed: int = 1, kind: str = "sampler") -> str:
    files = adapter_files(seed)
    if kind == "training":
        from tests.helpers import state_files

        files = {**files, "optimizer.safetensors": state_files()["optimizer.safetensors"]}
    req = uploads.UploadRequest(
        run_id=run_id,
        kind=kind,
        name=name,
        files=[uploads.DeclaredFile(p, len(b), __import__("hashlib").sha256(b).hexdigest()) for p, b in files.items()],
    )
    ans = uploads.declare(ctx, who, req)
    for f in ans.files:
        if f.transfer != "present":
            uploads.receive_bytes(ctx, who, ans.upload_id, f.path, files[f.path])
    return uploads.commit(ctx, who, ans.upload_id).tinker_path


@dataclass
class Setup:
    admin: Principal
    trainer: Principal
    run_id: str
    source: str
    save: Callable[..., str]


@pytest.fixture
def setup(ctx: Context, keys, base_dir: Path) -> Setup:  # type: ignore[no-untyped-def]
    admin = principal_for(ctx, keys.admin)
    trainer = principal_for(ctx, keys.trainer)
    basemodels.register(ctx, admin, BASE, base_dir)
    with session_scope(ctx.engine) as s:
        run = runs.create_run(s, trainer, base_model=BASE, now=ctx.clock.now(), lora_rank=4)
    source = save_adapter(ctx, trainer, run.id, "step-1")
    assert source == str(TinkerPath(run.id, "sampler", "step-1"))
    return Setup(admin, trainer, run.id, source, lambda name, **kw: save_adapter(ctx, trainer, run.id, name, **kw))
