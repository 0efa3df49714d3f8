"""A served weightstore that the real huggingface_hub / transformers / peft talk to (issue 15, part 3).

How the Hub libraries are pointed at the test server: the suite sets ``HF_HUB_OFFLINE=1`` for safety,
and ``huggingface_hub.constants`` reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` once, at import. The
``hf`` fixture therefore patches the constants themselves (``ENDPOINT``,
``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_OFFLINE``), the module-level ``huggingface_hub.hf_api.api``
instance's ``endpoint`` (peft's ``has_file`` goes through it), transformers' cached ``HfApi`` (made on first
use with the endpoint of that moment) *and* the environment (peft reads
``HF_HUB_OFFLINE`` from ``os.environ``), with a fresh ``HF_HUB_CACHE`` per test; monkeypatch undoes
all of it. Every call also passes ``token=`` (a weightstore key).

``CountingApp`` wraps the ASGI app and counts the response body bytes of every request, so a test
can show that no file byte goes through the API process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import Keys, LiveServer
from tests.exportjobs.builders import adapter_files, build_base
from weightstore import auth, basemodels, runs, uploads
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope

BASE = "tinyorg/tiny-llama"
RUN = "acme:exp1"  # repo acme/exp1


class CountingApp:
    """ASGI wrapper: body bytes of the successful (< 400) responses, per method and path."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.body_bytes: dict[str, int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = f"{scope['method']} {scope['path']}"
        status = [0]

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            if message["type"] == "http.response.body" and status[0] < 400:  # an error's JSON body is no file
                self.body_bytes[key] = self.body_bytes.get(key, 0) + len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting_send)

    def resolve_bytes(self) -> int:
        return sum(n for k, n in self.body_bytes.items() if "/resolve/" in k)


@dataclass
class Served:
    url: str
    counter: CountingApp


@pytest.fixture
def hub_server(ctx: Context) -> Iterator[Served]:
    srv = LiveServer(ctx)
    counter = CountingApp(srv.app)
    srv.server.config.app = counter  # uvicorn loads config.app when it starts
    srv.start()
    yield Served(srv.url, counter)
    srv.stop()


@pytest.fixture
def hf(hub_server: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Served:
    import huggingface_hub.constants as c
    from huggingface_hub import hf_api

    cache = tmp_path / "hf-cache"
    for name, value in {
        "HF_ENDPOINT": hub_server.url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(c, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_api.api, "endpoint", hub_server.url)  # the module-level HfApi() behind has_file & co
    import transformers.utils.hub as transformers_hub

    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers keeps one HfApi, made on first use
    return hub_server


def principal_for(ctx: Context, key: str) -> Principal:
    with session_scope(ctx.engine) as s:
        return auth.authenticate(s, key, now=ctx.clock.now())


def save_files(ctx: Context, who: Principal, run_id: str, kind: str, name: str, files: dict[str, bytes]) -> str:
    req = uploads.UploadRequest(
        run_id=run_id,
        kind=kind,
        name=name,
        files=[uploads.DeclaredFile(p, len(b), hashlib.sha256(b).hexdigest()) for p, b in files.items()],
    )
    ans = uploads.declare(ctx, who, req)
    for f in ans.files:
        if f.transfer != "present":
            uploads.receive_bytes(ctx, who, ans.upload_id, f.path, files[f.path])
    return uploads.commit(ctx, who, ans.upload_id).tinker_path


def add_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "t1": 1, "t2": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


def peft_adapter_files(base_dir: Path, seed: int = 3) -> dict[str, bytes]:
    """A real PEFT LoRA (peft's own save_pretrained) on the tiny base, as a sampler checkpoint's files."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = build_base(tmp_path_factory.mktemp("hubbase") / "tiny", shard="16KB")
    add_tokenizer(d)
    return d


@dataclass
class World:
    admin: Principal
    trainer: Principal
    other: Principal
    keys: Keys
    run_id: str
    base_dir: Path
    sampler_files: dict[str, bytes] = field(default_factory=dict)


@pytest.fixture
def world(ctx: Context, keys: Keys, base_dir: Path) -> World:
    admin, trainer, other = (principal_for(ctx, k) for k in (keys.admin, keys.trainer, keys.other_trainer))
    basemodels.register(ctx, admin, BASE, base_dir)
    with session_scope(ctx.engine) as s:
        run = runs.create_run(s, trainer, base_model=BASE, now=ctx.clock.now(), run_id=RUN, lora_rank=4)
    files = peft_adapter_files(base_dir)
    save_files(ctx, trainer, run.id, "sampler", "step-1", files)
    save_files(ctx, trainer, run.id, "sampler", "tinker-1", adapter_files(1, base_name=BASE))
    return World(admin, trainer, other, keys, run.id, base_dir, files)


def manifest_of(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
