"""The Hub read protocol driven by the real huggingface_hub, transformers and peft (issue 15, parts 1 and 3).

Heavy model-loading tests run on SQLite only (the look-ups are plain catalog reads covered on both
backends by the isolation and error tests)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
import pytest
import torch

from tests.hub.conftest import BASE, Served, World, manifest_of, save_files
from weightstore import exportjobs, hub
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.models import TenantState
from weightstore.names import TinkerPath

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
REPO = "acme/exp1"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- mapping (no server) -------------------------------------------------------------------------


def test_run_repo_names_are_valid_unique_and_deterministic() -> None:
    """issue 15, part 1: Tinker run ids (with ':') map to valid, distinct Hub repo names."""
    from huggingface_hub.utils import validate_repo_id

    ids = [
        "acme:exp1",
        "acme:exp.1",
        "acme:exp:1",
        "acme:a--b",
        "acme:a..b",
        "acme:" + "x" * 150,
        "0f8fad5b-d9cb-469f-a165-70867728950e:train:0",
        "0f8fad5b-d9cb-469f-a165-70867728950e:train:1",
        "exp1",  # a legacy id outside the tenant's namespace never takes a verbatim name
        "acme:-lead",
    ]
    names = [hub.run_repo_name(r, "acme") for r in ids]
    assert names[0] == "exp1" and names[1] == "exp.1" and names[2].startswith("exp.1-")
    assert names[6].startswith("0f8fad5b-d9cb-469f-a165-70867728950e.train.0-") and len(names[6]) == 36 + 8 + 11
    assert len(set(names)) == len(names)
    assert names == [hub.run_repo_name(r, "acme") for r in ids]
    for n in names:
        validate_repo_id(f"acme/{n}")
        assert hub.is_repo_part(n) and len(n) <= 96
    assert hub.base_repo_id("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert hub.base_repo_id("tiny") == "base/tiny"
    assert hub.base_repo_id("a/b/c") is None
    assert hub.split_revision_path("sampler_weights/step-1/adapter_config.json") == (
        "sampler_weights/step-1",
        "adapter_config.json",
    )
    assert hub.split_revision_path("main/sampler_weights/step-1/x.json") == ("main", "sampler_weights/step-1/x.json")


# --- reads with the real libraries ----------------------------------------------------------------


@SQLITE_ONLY
def test_snapshot_download_sharded_base_from_pretrained_and_tokenizer(hf: Served, world: World) -> None:
    """issue 15, part 3: snapshot_download, a sharded from_pretrained and AutoTokenizer; zero file
    bytes through the API (resolve answers have empty bodies)."""
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    token = world.keys.reader
    local = Path(snapshot_download(BASE, token=token))
    want = {p: s for p, s in manifest_of(world.base_dir).items() if p != "README.md"}
    assert manifest_of(local) == want
    assert sum(1 for p in want if p.endswith(".safetensors")) >= 3  # really sharded

    model = AutoModelForCausalLM.from_pretrained(BASE, token=token)
    _assert_same_state(_state(model), _state(AutoModelForCausalLM.from_pretrained(world.base_dir)))
    tok = AutoTokenizer.from_pretrained(BASE, token=token)
    assert tok("t1 t2")["input_ids"] == [1, 2]

    assert hf.counter.resolve_bytes() == 0
    file_bytes = sum((world.base_dir / p).stat().st_size for p in want)
    assert sum(hf.counter.body_bytes.values()) < file_bytes / 4


@SQLITE_ONLY
def test_hf_hub_download_with_and_without_range_resume(hf: Served, world: World) -> None:
    """issue 15, part 3: hf_hub_download, and a download resumed with Range from the redirect target."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get

    token = world.keys.trainer
    shard = next(p for p in sorted(manifest_of(world.base_dir)) if p.endswith(".safetensors"))
    data = (world.base_dir / shard).read_bytes()
    got = Path(hf_hub_download(BASE, shard, token=token))
    assert got.read_bytes() == data

    meta = get_hf_file_metadata(hf_hub_url(BASE, shard), token=token)
    assert meta.etag == hashlib.sha256(data).hexdigest() and meta.size == len(data)
    assert meta.location != hf_hub_url(BASE, shard) and not meta.location.startswith(hf.url)  # the store, not us
    half = len(data) // 2
    buf = io.BytesIO(data[:half])
    buf.seek(half)
    http_get(meta.location, buf, resume_size=half, expected_size=len(data))  # sends Range: bytes=half-
    assert buf.getvalue() == data
    assert hf.counter.resolve_bytes() == 0


@SQLITE_ONLY
def test_peft_loads_sampler_checkpoint_and_exports_and_merged_from_pretrained(hf: Served, world: World, ctx: Context) -> None:
    """issue 15, part 1 (a), (b): PeftModel for a sampler checkpoint (by revision and by subfolder)
    and a PEFT export; AutoModelForCausalLM for a merged export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    token = world.keys.trainer
    tokens = torch.tensor([[1, 5, 9, 2]])
    sampler = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(BASE, token=token), REPO, revision="sampler_weights/step-1", token=token
    )
    local_dir = Path(ctx.settings.data_dir) / "peft-local"
    local_dir.mkdir(parents=True)
    for p, b in world.sampler_files.items():
        (local_dir / p).write_bytes(b)
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.base_dir), local_dir)
    with torch.no_grad():
        assert torch.equal(sampler(tokens).logits, local(tokens).logits)
    via_main = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(BASE, token=token), REPO, subfolder="sampler_weights/step-1", token=token
    )
    with torch.no_grad():
        assert torch.equal(via_main(tokens).logits, local(tokens).logits)

    source = str(TinkerPath(world.run_id, "sampler", "tinker-1"))
    for target in ("merged", "peft"):
        exportjobs.submit(ctx, world.trainer, source, target=target, base_model=BASE, output_name=f"tinker-1-{target}")
    while exportjobs.run_one(ctx, "w"):
        pass
    jobs = _get(hf.url + "/v1/exports", token).json()["jobs"]
    assert sorted((j["state"], j["hub"]["repo_id"], j["hub"]["revision"]) for j in jobs) == [
        ("succeeded", REPO, "external_weights/tinker-1-peft"),
        ("succeeded", REPO, "merged_weights/tinker-1-merged"),
    ]
    merged = AutoModelForCausalLM.from_pretrained(REPO, revision="merged_weights/tinker-1-merged", token=token)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(BASE, token=token), REPO, revision="external_weights/tinker-1-peft", token=token
    )
    with torch.no_grad():
        a, b = merged(tokens).logits, peft(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(world.base_dir)(tokens).logits
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter did something
    assert torch.allclose(a, b, atol=1e-4)
    assert hf.counter.resolve_bytes() == 0


@SQLITE_ONLY
def test_run_main_is_the_vllm_resolver_layout(hf: Served, world: World) -> None:
    """issue 15, part 1 (c): the run's main lists one subdirectory per checkpoint holding its
    adapter_config.json; snapshot_download(allow_patterns=dir/*) fetches one adapter."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=hf.url, token=world.keys.trainer)
    files = api.list_repo_files(REPO)
    adapters = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/adapter_config.json")})
    assert adapters == ["sampler_weights/step-1", "sampler_weights/tinker-1"]
    local = Path(snapshot_download(REPO, allow_patterns="sampler_weights/step-1/*", token=world.keys.trainer))
    assert {p: hashlib.sha256(b).hexdigest() for p, b in world.sampler_files.items()} == {
        p.removeprefix("sampler_weights/step-1/"): s for p, s in manifest_of(local).items()
    }
    info = api.model_info(REPO, revision="sampler_weights/step-1")
    assert info.sha is not None and len(info.sha) == 40
    assert api.model_info(REPO, revision=info.sha).sha == info.sha  # a checkpoint's commit id resolves
    assert sorted(s.rfilename for s in info.siblings or []) == sorted(world.sampler_files)


# --- isolation, sharing, errors (both backends) ------------------------------------------------------


def _get(url: str, key: str | None, method: str = "GET") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, url, headers=headers, follow_redirects=False, timeout=30)


def test_foreign_is_missing_and_published_is_shared(hf: Served, world: World, ctx: Context) -> None:
    """issue 15, part 1: another tenant's repo answers exactly like a missing one until a checkpoint
    is published; then only the published checkpoint is visible to the other tenant."""
    other = world.keys.other_trainer
    for path in (
        f"/api/models/{REPO}",
        f"/api/models/{REPO}/revision/sampler_weights%2Fstep-1",
        f"/api/models/{REPO}/tree/main",
        f"/{REPO}/resolve/sampler_weights%2Fstep-1/adapter_config.json",
    ):
        foreign = _get(hf.url + path, other, "HEAD" if "resolve" in path else "GET")
        missing = _get(hf.url + path.replace("exp1", "exp2"), other, "HEAD" if "resolve" in path else "GET")
        assert (foreign.status_code, foreign.headers["X-Error-Code"]) == (missing.status_code, missing.headers["X-Error-Code"])
        assert (foreign.status_code, foreign.headers["X-Error-Code"]) == (404, "RepoNotFound")

    with session_scope(ctx.engine) as s:
        from weightstore.tinker import checkpoints as tinker_checkpoints

        tinker_checkpoints.set_public(s, world.trainer, TinkerPath(world.run_id, "sampler", "step-1"), True, now=ctx.clock.now())
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=hf.url, token=other)
    assert api.list_repo_files(REPO) == sorted(f"sampler_weights/step-1/{p}" for p in world.sampler_files)
    got = Path(hf_hub_download(REPO, "adapter_config.json", revision="sampler_weights/step-1", token=other))
    assert got.read_bytes() == world.sampler_files["adapter_config.json"]
    r = _get(hf.url + f"/{REPO}/resolve/sampler_weights%2Ftinker-1/adapter_config.json", other, "HEAD")
    assert (r.status_code, r.headers["X-Error-Code"]) == (404, "RevisionNotFound")


def test_each_error_code_401_and_no_route_shadowing(hf: Served, world: World, ctx: Context) -> None:
    """issue 15, part 1: RepoNotFound, RevisionNotFound, EntryNotFound (with X-Repo-Commit), 401 on a
    bad or missing token, GatedRepo for a disabled tenant; the library raises its typed errors; the
    resolve catch-all does not shadow /v1, /api/v1 or /healthz."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    key = world.keys.trainer
    cases = {
        f"/{REPO}/resolve/main/nope.json": (404, "EntryNotFound"),
        f"/{REPO}/resolve/sampler_weights%2Fstep-9/adapter_config.json": (404, "RevisionNotFound"),
        f"/{REPO}/resolve/v9/adapter_config.json": (404, "RevisionNotFound"),
        "/acme/nope/resolve/main/config.json": (404, "RepoNotFound"),
        "/acme/bad--name/resolve/main/config.json": (404, "RepoNotFound"),
        f"/api/models/{REPO}/tree/main/nope": (404, "EntryNotFound"),
    }
    for path, (status, code) in cases.items():
        r = _get(hf.url + path, key, "HEAD" if "resolve" in path else "GET")
        assert (r.status_code, r.headers.get("X-Error-Code")) == (status, code), path
    assert len(_get(hf.url + f"/{REPO}/resolve/main/nope.json", key, "HEAD").headers["X-Repo-Commit"]) == 40
    for bad in (None, "tml-not-a-key"):
        r = _get(hf.url + f"/{BASE}/resolve/main/config.json", bad, "HEAD")
        assert r.status_code == 401 and "X-Error-Code" not in r.headers
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/nope", "config.json", token=key)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", revision="sampler_weights/step-9", token=key)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(BASE, "tokenizer.model", token=key)

    from weightstore import tenants

    with session_scope(ctx.engine) as s:
        tenants.set_state(s, "acme", TenantState.disabled, now=ctx.clock.now())
    r = _get(hf.url + f"/{BASE}/resolve/main/config.json", key, "HEAD")
    assert (r.status_code, r.headers.get("X-Error-Code")) == (403, "GatedRepo")
    with session_scope(ctx.engine) as s:
        tenants.set_state(s, "acme", TenantState.active, now=ctx.clock.now())

    assert _get(hf.url + "/healthz", None).json() == {"status": "ok"}
    assert _get(hf.url + "/v1/whoami", key).json()["tenant_id"] == "acme"
    # /{namespace}/{name}/resolve/... with namespace=v1, name=checkpoints is the native route's
    # (run id "resolve"), matched first: its own 404, not the Hub's
    r = _get(hf.url + "/v1/checkpoints/resolve/sampler_weights/x", key)
    assert (r.status_code, r.json()["code"], r.headers.get("X-Error-Code")) == (404, "not_found", None)
    assert _get(hf.url + "/api/v1/healthz", key).status_code == 200


def test_tree_pagination_and_resolve_headers(hf: Served, world: World) -> None:
    """issue 15, part 1: tree pages linked with Link rel=next; a resolve 302 carries the Hub's headers."""
    key = world.keys.trainer
    full = _get(hf.url + f"/api/models/{REPO}/tree/main?recursive=true", key).json()
    assert [e["path"] for e in full if e["type"] == "directory"] == [
        "sampler_weights",
        "sampler_weights/step-1",
        "sampler_weights/tinker-1",
    ]
    url, pages = hf.url + f"/api/models/{REPO}/tree/main?recursive=true&limit=2", []
    while url:
        r = _get(url, key)
        pages.append(r.json())
        url = r.links.get("next", {}).get("url")
    assert len(pages) == (len(full) + 1) // 2 and [e for p in pages for e in p] == full
    top = _get(hf.url + f"/api/models/{REPO}/tree/main", key).json()
    assert top == [{"type": "directory", "oid": top[0]["oid"], "size": 0, "path": "sampler_weights"}]

    cfg = world.sampler_files["adapter_config.json"]
    r = _get(hf.url + f"/{REPO}/resolve/main/sampler_weights/step-1/adapter_config.json", key)
    sha = hashlib.sha256(cfg).hexdigest()
    assert r.status_code == 302 and r.content == b""
    assert r.headers["X-Linked-Etag"] == f'"{sha}"' == r.headers["ETag"]
    assert r.headers["X-Linked-Size"] == str(len(cfg)) and len(r.headers["X-Repo-Commit"]) == 40
    assert httpx.get(r.headers["Location"]).content == cfg  # presigned: no key needed


def test_native_answers_carry_hub_coordinates(hf: Served, world: World, ctx: Context) -> None:
    """issue 15, part 1: checkpoint answers of the native API carry repo_id, revision, subfolder, and
    those coordinates resolve, also for a server-minted run id (``{uuid}:train:0``, hashed repo name)."""
    from weightstore import runs

    r = _get(hf.url + f"/v1/checkpoints/{world.run_id}/sampler_weights/step-1", world.keys.trainer)
    assert r.json()["hub"] == {"repo_id": REPO, "revision": "sampler_weights/step-1", "subfolder": "sampler_weights/step-1"}
    listed = _get(hf.url + f"/v1/checkpoints?run_id={world.run_id}", world.keys.trainer).json()["checkpoints"]
    assert {c["hub"]["revision"] for c in listed} == {"sampler_weights/step-1", "sampler_weights/tinker-1"}

    with session_scope(ctx.engine) as s:
        minted = runs.create_run(s, world.trainer, base_model=BASE, now=ctx.clock.now()).id
    save_files(ctx, world.trainer, minted, "sampler", "s1", world.sampler_files)
    coords = _get(hf.url + f"/v1/checkpoints/{minted}/sampler_weights/s1", world.keys.trainer).json()["hub"]
    assert coords["repo_id"] == f"acme/{hub.run_repo_name(minted, 'acme')}" and ":" not in coords["repo_id"]
    rev = coords["revision"].replace("/", "%2F")
    r = _get(hf.url + f"/{coords['repo_id']}/resolve/{rev}/adapter_config.json", world.keys.trainer, "HEAD")
    assert (
        r.status_code == 302
        and r.headers["X-Linked-Etag"] == f'"{hashlib.sha256(world.sampler_files["adapter_config.json"]).hexdigest()}"'
    )
    r = _get(hf.url + f"/{coords['repo_id']}/resolve/{rev}/adapter_config.json", world.keys.other_trainer, "HEAD")
    assert (r.status_code, r.headers["X-Error-Code"]) == (404, "RepoNotFound")


def test_empty_owned_run_and_deleted_checkpoint(hf: Served, world: World, ctx: Context) -> None:
    """issue 15, part 1: a deleted checkpoint leaves the run's main at once; main's commit id moves."""
    from weightstore import checkpoints

    key = world.keys.trainer
    before = _get(hf.url + f"/api/models/{REPO}", key).json()["sha"]
    with session_scope(ctx.engine) as s:
        checkpoints.delete(s, world.trainer, TinkerPath(world.run_id, "sampler", "tinker-1"), now=ctx.clock.now())
    after = _get(hf.url + f"/api/models/{REPO}", key).json()
    assert after["sha"] != before and {s["rfilename"].split("/")[1] for s in after["siblings"]} == {"step-1"}
    r = _get(hf.url + f"/api/models/{REPO}/revision/{before}", key)
    assert (r.status_code, r.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    save_files(ctx, world.trainer, world.run_id, "sampler", "step-2", world.sampler_files)
    assert "sampler_weights/step-2/adapter_config.json" in [
        s["rfilename"] for s in _get(hf.url + f"/api/models/{REPO}", key).json()["siblings"]
    ]
