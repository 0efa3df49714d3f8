"""The Hub write side with the real huggingface_hub and peft (issue 15, parts 2 and 3, write half):
``create_repo``, ``upload_folder``/``create_commit`` into checkpoints, dedup, isolation, auth."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import col, select

from tests.hub.conftest import BASE, Served, World, peft_adapter_files
from weightstore import checkpoints, retention, tensorio
from weightstore.clock import FakeClock
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import NotFound
from weightstore.models import Checkpoint, CheckpointState, Upload, UploadFile, UploadState
from weightstore.names import TinkerPath


@pytest.fixture(autouse=True)
def no_xet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pushes need ``HF_HUB_DISABLE_XET=1``: with ``hf_xet`` installed huggingface_hub 2.x uploads
    through Xet only (no fallback), and weightstore speaks the LFS ``basic`` transfer."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)


class PutCounter:
    """Counts the PUTs huggingface_hub sends to upload URLs (the LFS basic transfer)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub.lfs as lfs

        self.puts: list[str] = []
        real = lfs.http_backoff

        def counting(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            if method == "PUT":
                self.puts.append(url)
            return real(method, url, *args, **kwargs)

        monkeypatch.setattr(lfs, "http_backoff", counting)


def _api(hf: Served, key: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hf.url, token=key)


def _write_dir(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def _ckpt(ctx: Context, run_id: str, kind: str, name: str) -> Checkpoint | None:
    with session_scope(ctx.engine) as s:
        try:
            return checkpoints.find(s, TinkerPath(run_id, kind, name), now=ctx.clock.now())
        except NotFound:
            return None


def test_create_repo_and_upload_folder_round_trip_through_peft(
    ctx: Context, hf: Served, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15, part 2/3: create_repo makes run acme:pushed (exist_ok both ways), upload_folder of a
    sampler checkpoint folder commits it through the upload protocol (bytes PUT to the store, never the
    API), PeftModel.from_pretrained loads exactly those weights back, and pushing the same folder again
    moves 0 bytes and commits nothing."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    api = _api(hf, world.keys.trainer)
    url = api.create_repo("acme/pushed")
    assert url.repo_id == "acme/pushed"
    api.create_repo("acme/pushed", exist_ok=True)  # idempotent
    fresh = peft_adapter_files(world.base_dir, seed=11)  # bytes the tenant does not hold yet
    folder = _write_dir(tmp_path / "adapter", fresh)
    puts = PutCounter(monkeypatch)
    info = api.upload_folder(repo_id="acme/pushed", folder_path=folder, path_in_repo="sampler_weights/step-5")
    # only the new weights move: README.md and adapter_config.json are the bytes of the tenant's
    # step-1 (world fixture), answered present by the LFS batch exactly like a native declare
    assert fresh["adapter_config.json"] == world.sampler_files["adapter_config.json"]
    assert len(puts.puts) == 1 and "/staging/" in puts.puts[0]
    assert all(hf.url not in u for u in puts.puts)  # to the store, not through the API
    assert hf.counter.body_bytes.get("POST /api/models/acme/pushed/commit/main", 0) > 0

    ckpt = _ckpt(ctx, "acme:pushed", "sampler", "step-5")
    assert ckpt is not None and ckpt.state == CheckpointState.committed
    with session_scope(ctx.engine) as s:
        files = {f.path: f.sha256 for f in checkpoints.files_of(s, ckpt)}
        default_ttl = retention.tenant_default_ttl(s, ckpt.tenant_id, "sampler")
    assert files == {p: hashlib.sha256(b).hexdigest() for p, b in fresh.items()}
    # TTL: the tenant's default for the kind, as for a native save without ttl_seconds
    want_expiry = None if default_ttl is None else ckpt.created_at + timedelta(seconds=default_ttl)
    assert ckpt.expires_at == want_expiry
    assert info.oid == api.model_info("acme/pushed").sha  # the answer's commit is main's

    base = AutoModelForCausalLM.from_pretrained(world.base_dir)
    model = PeftModel.from_pretrained(base, "acme/pushed", revision="sampler_weights/step-5", token=world.keys.trainer)
    want = tensorio.load_weights(fresh["adapter_model.safetensors"])
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(got) == len(want) > 0
    for n, p in got.items():
        key = next(k for k in want if k.replace(".weight", "") in n.replace(".default", ""))
        assert torch.equal(p.detach(), want[key])

    # the same folder again: preupload answers each file's sha256, the client skips them all
    puts.puts.clear()
    hf.counter.body_bytes.clear()
    api.upload_folder(repo_id="acme/pushed", folder_path=folder, path_in_repo="sampler_weights/step-5")
    assert puts.puts == []
    assert "POST /api/models/acme/pushed/commit/main" not in hf.counter.body_bytes
    with session_scope(ctx.engine) as s:
        open_carriers = s.exec(select(Upload).where(Upload.kind == "hub", Upload.state == UploadState.open)).all()
    assert open_carriers == []  # the batch's carrier was released when its bytes were committed


def test_create_commit_several_operations(ctx: Context, hf: Served, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15, part 2: one create_commit with a sampler folder (one file already held: 0 bytes for it,
    an empty file sent inline and stored as a blob), a full-state folder and a deletedFolder of an
    existing checkpoint: two checkpoints committed, one deleted, every byte readable back."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, hf_hub_download

    opt = tensorio.optimizer_bytes({"state": {}, "param_groups": [{"lr": 0.1, "params": []}]})
    held = world.sampler_files["adapter_model.safetensors"]  # committed by the world fixture already
    config = world.sampler_files["adapter_config.json"]
    ops = [
        CommitOperationAdd("sampler_weights/multi/adapter_model.safetensors", held),
        CommitOperationAdd("sampler_weights/multi/adapter_config.json", config),
        CommitOperationAdd("sampler_weights/multi/notes/empty.txt", b""),
        CommitOperationAdd("weights/state-1/adapter_model.safetensors", held),
        CommitOperationAdd("weights/state-1/adapter_config.json", config),
        CommitOperationAdd("weights/state-1/optimizer.safetensors", opt),
        CommitOperationDelete("sampler_weights/tinker-1/"),
    ]
    puts = PutCounter(monkeypatch)
    api = _api(hf, world.keys.trainer)
    api.create_commit("acme/exp1", ops, commit_message="two checkpoints")
    assert sorted(puts.puts) and len(puts.puts) == 1  # only the optimizer: the rest is held or inline/deduped
    assert _ckpt(ctx, world.run_id, "sampler", "multi") is not None
    state = _ckpt(ctx, world.run_id, "training", "state-1")
    assert state is not None and state.size_bytes == len(held) + len(config) + len(opt)
    assert _ckpt(ctx, world.run_id, "sampler", "tinker-1") is None  # deleted
    p = hf_hub_download("acme/exp1", "optimizer.safetensors", revision="weights/state-1", token=world.keys.trainer)
    assert Path(p).read_bytes() == opt
    p = hf_hub_download("acme/exp1", "sampler_weights/multi/notes/empty.txt", token=world.keys.trainer)
    assert Path(p).read_bytes() == b""


def test_push_mapping_of_other_paths_and_refusals(ctx: Context, hf: Served, world: World) -> None:
    """issue 15, part 2 (mapping): a root file becomes the ``files/root`` checkpoint, served at the root
    of ``main``, and a second push adds to it; paths under an export's segment, a file directly under
    a segment, the reserved ``root/`` folder and a revision other than main are 400s that store nothing."""
    from huggingface_hub import CommitOperationAdd, hf_hub_download
    from huggingface_hub.errors import BadRequestError

    api = _api(hf, world.keys.trainer)
    api.create_commit("acme/exp1", [CommitOperationAdd("README.md", b"# run notes\n")], commit_message="x")
    api.create_commit("acme/exp1", [CommitOperationAdd("extra/config.json", b'{"a": 1}')], commit_message="y")
    api.create_commit("acme/exp1", [CommitOperationAdd("notes.txt", b"second push\n")], commit_message="z")
    root = _ckpt(ctx, world.run_id, "files", "root")
    assert root is not None
    with session_scope(ctx.engine) as s:
        assert sorted(f.path for f in checkpoints.files_of(s, root)) == ["README.md", "notes.txt"]  # merged
    assert Path(hf_hub_download("acme/exp1", "README.md", token=world.keys.trainer)).read_bytes() == b"# run notes\n"
    got = hf_hub_download("acme/exp1", "config.json", revision="files/extra", token=world.keys.trainer)
    assert Path(got).read_bytes() == b'{"a": 1}'

    refused = {
        "merged_weights/m/config.json": "exports are made by weightstore",
        "sampler_weights/loose.json": "sampler_weights/NAME",
        "root/x.txt": "reserved",
    }
    for path, message in refused.items():
        with pytest.raises(BadRequestError, match=message):
            api.create_commit("acme/exp1", [CommitOperationAdd(path, b"{}")], commit_message="x")
    with pytest.raises(BadRequestError, match="revision 'main'"):
        api.create_commit(
            "acme/exp1",
            [CommitOperationAdd("sampler_weights/x/adapter_config.json", b"{}")],
            commit_message="x",
            revision="sampler_weights/step-1",
        )
    assert _ckpt(ctx, world.run_id, "sampler", "x") is None
    assert _ckpt(ctx, world.run_id, "merged", "m") is None


def test_foreign_repo_is_missing_on_write_and_bad_token_is_401(hf: Served, world: World) -> None:
    """issue 15, part 3: another tenant's repo is RepoNotFound for create_repo, preupload/commit and the
    LFS batch (as for reads); a bad token is 401."""
    import httpx
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    other = _api(hf, world.keys.other_trainer)
    with pytest.raises(RepositoryNotFoundError):
        other.create_commit("acme/exp1", [CommitOperationAdd("sampler_weights/z/adapter_config.json", b"{}")], commit_message="x")
    with pytest.raises(RepositoryNotFoundError):
        other.create_repo("acme/new-one")
    r = httpx.post(
        f"{hf.url}/acme/exp1.git/info/lfs/objects/batch",
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": "0" * 64, "size": 1}]},
        headers={"Authorization": f"Bearer {world.keys.other_trainer}"},
    )
    assert (r.status_code, r.headers.get("X-Error-Code")) == (404, "RepoNotFound")
    bad = _api(hf, "tml-not-a-key")
    with pytest.raises(HfHubHTTPError) as exc:
        bad.create_repo("acme/whatever")
    assert exc.value.response.status_code == 401


def test_lfs_batch_dedup_is_per_tenant_like_native_declare(hf: Served, world: World) -> None:
    """issue 15, part 2: the LFS batch answers "present" (no actions) only for bytes the pushing tenant
    holds; another tenant pushing the very same bytes gets an upload action, so the answer reveals
    nothing about what other tenants store (S4, the native declare's rule, ``uploads.held_blobs``)."""
    import httpx

    data = world.sampler_files["adapter_model.safetensors"]  # held by acme (world fixture)
    obj = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
    other_ns = world.other.tenant_id
    _api(hf, world.keys.other_trainer).create_repo(f"{other_ns}/mine")

    def batch(repo: str, key: str) -> dict[str, Any]:
        r = httpx.post(
            f"{hf.url}/{repo}.git/info/lfs/objects/batch",
            json={"operation": "upload", "transfers": ["basic", "multipart"], "objects": [obj], "hash_algo": "sha256"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["transfer"] == "basic"
        return body["objects"][0]

    own = batch("acme/exp1", world.keys.trainer)
    assert own == obj  # present: no actions
    foreign = batch(f"{other_ns}/mine", world.keys.other_trainer)
    assert set(foreign["actions"]) == {"upload"} and "/staging/" in foreign["actions"]["upload"]["href"]


def _tiny_trainer(out: Path, key: str, max_steps: int, *, push: bool) -> Any:
    from torch.utils.data import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    class Tokens(Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.tensor([1 + i % 3, 2, 3, 4])
            return {"input_ids": ids, "labels": ids.clone()}

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=1,
        save_strategy="steps",
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        push_to_hub=push,
        hub_model_id="acme/trainer-run" if push else None,
        hub_strategy="checkpoint",
        hub_token=key if push else None,
        disable_tqdm=True,
        logging_steps=1,
    )
    return Trainer(model=LlamaForCausalLM(cfg), args=args, train_dataset=Tokens())


def test_trainer_push_to_hub_then_resume_from_what_it_pushed(ctx: Context, hf: Served, world: World, tmp_path: Path) -> None:
    """issue 15, part 2/3: a tiny-model HF Trainer (CPU, 3 steps) with push_to_hub=True and
    hub_strategy="checkpoint" saves into weightstore; a fresh Trainer resumes from the pushed
    ``last-checkpoint`` (downloaded with snapshot_download) at step 3, optimizer state included."""
    from huggingface_hub import snapshot_download

    trainer = _tiny_trainer(tmp_path / "out", world.keys.trainer, 3, push=True)
    trainer.train()
    trainer.push_to_hub()  # waits for the pushes made at every save
    last = _ckpt(ctx, "acme:trainer-run", "files", "last-checkpoint")
    assert last is not None
    local = snapshot_download(
        "acme/trainer-run", allow_patterns=["last-checkpoint/*"], token=world.keys.trainer, local_dir=tmp_path / "pulled"
    )
    ckpt_dir = Path(local) / "last-checkpoint"
    pushed_state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    step = pushed_state["global_step"]  # the Trainer skips a save's push while the previous one runs
    assert 1 <= step <= 3
    assert (ckpt_dir / "optimizer.pt").read_bytes() == (tmp_path / "out" / f"checkpoint-{step}" / "optimizer.pt").read_bytes()
    with session_scope(ctx.engine) as s:
        pushed = {f.path for f in checkpoints.files_of(s, last)}
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "model.safetensors"} <= pushed

    # the root of main is the final model, loadable by name
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained("acme/trainer-run", token=world.keys.trainer)
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(final.state_dict()[name], p), name

    resumed = _tiny_trainer(tmp_path / "out2", world.keys.trainer, step + 1, push=False)
    resumed.train(resume_from_checkpoint=str(ckpt_dir))
    assert resumed.state.global_step == step + 1
    # the history up to ``step`` came back from the pushed trainer_state.json; one step was trained anew
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == list(range(1, step + 2))


MiB = 1024 * 1024


def _lower_single_put(ctx: Context, limit: int) -> None:
    """The served app reads ``ctx.settings`` per request: objects above ``limit`` go multipart."""
    ctx.settings = ctx.settings.model_copy(update={"single_put_max_bytes": limit})


def _carrier_rows(ctx: Context) -> list[tuple[str, str | None]]:
    """(carrier id, multipart upload id) of every file row of an open LFS carrier upload."""
    with session_scope(ctx.engine) as s:
        rows = s.exec(
            select(UploadFile.upload_id, UploadFile.multipart_upload_id)
            .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
            .where(Upload.kind == "hub", Upload.state == UploadState.open)
        ).all()
        return [(a, b) for a, b in rows]


def test_lfs_multipart_push_and_refusals_with_the_real_client(
    ctx: Context, hf: Served, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15, part 2 (LFS multipart). With the single-PUT limit lowered to 5 MiB, upload_folder of a
    5 MiB + 100 B file and a small one gets the Hub's multipart answer for the large one (chunk_size,
    parts 1..2 presigned to the carrier's own staging key, completion through the API) and a basic
    PUT for the small one; the commit re-hashes and stores both, every byte reads back, the carrier is
    closed. Then a completion naming a wrong etag or too few parts is a 400 saying which part (the
    Hub's X-Error-Message too), and that push commits nothing; the completion URL answers another
    tenant's key, a wrong token or another repo as 404 EntryNotFound (foreign = missing)."""
    import httpx
    import huggingface_hub.lfs as lfs
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import BadRequestError

    _lower_single_put(ctx, 5 * MiB)
    big = bytes(range(256)) * (5 * MiB // 256) + b"t" * 100
    small = b'{"note": "small"}'
    puts = PutCounter(monkeypatch)
    api = _api(hf, world.keys.trainer)
    api.upload_folder(
        repo_id="acme/exp1",
        folder_path=_write_dir(tmp_path / "push", {"big.bin": big, "small.json": small}),
        path_in_repo="bundle",
    )

    assert len(puts.puts) == 3  # 2 parts + 1 basic PUT, all to the store's staging area
    assert all("/staging/upl" in u and hf.url not in u for u in puts.puts)
    assert sum("partNumber=" in u for u in puts.puts) == 2
    big_sha = hashlib.sha256(big).hexdigest()
    completes = [k for k in hf.counter.body_bytes if "/info/lfs/complete/" in k]
    assert len(completes) == 1 and completes[0].endswith(big_sha)
    ckpt = _ckpt(ctx, world.run_id, "files", "bundle")
    assert ckpt is not None and ckpt.size_bytes == len(big) + len(small)
    with session_scope(ctx.engine) as s:
        assert {f.path: f.sha256 for f in checkpoints.files_of(s, ckpt)} == {
            "big.bin": big_sha,
            "small.json": hashlib.sha256(small).hexdigest(),
        }
    assert Path(hf_hub_download("acme/exp1", "bundle/big.bin", token=world.keys.trainer)).read_bytes() == big
    assert _carrier_rows(ctx) == []  # handed over to the commit, then closed

    bad = b"\x01" * (5 * MiB + 7)
    folder = _write_dir(tmp_path / "bad", {"big.bin": bad})
    real = lfs._get_completion_payload

    def wrong_etag(headers: list[Any], oid: str) -> Any:
        payload = real(headers, oid)
        payload["parts"][1]["etag"] = '"0123456789abcdef0123456789abcdef"'
        return payload

    def missing_part(headers: list[Any], oid: str) -> Any:
        payload = real(headers, oid)
        payload["parts"] = payload["parts"][:-1]
        return payload

    for corrupt, message in ((wrong_etag, "part 2's etag"), (missing_part, "has 2 parts, 1 named")):
        monkeypatch.setattr(lfs, "_get_completion_payload", corrupt)
        with pytest.raises(RuntimeError, match="Error while uploading 'broken/big.bin'") as exc:
            api.upload_folder(repo_id="acme/exp1", folder_path=folder, path_in_repo="broken")
        cause = exc.value.__cause__
        assert isinstance(cause, BadRequestError) and message in str(cause), cause
        assert message in cause.response.headers["X-Error-Message"]
        assert _ckpt(ctx, world.run_id, "files", "broken") is None
    # the refused multipart upload stays reserved (incomplete): the second push of the same bytes
    # resumed it (fresh part URLs, a new completion token) instead of reserving them again
    assert len(_carrier_rows(ctx)) == 1 and all(mpu for _, mpu in _carrier_rows(ctx))
    ((carrier_id, _),) = _carrier_rows(ctx)
    monkeypatch.setattr(lfs, "_get_completion_payload", real)

    # a batch by hand resumes it too: its completion URL, tried by others and with wrong etags
    sha = hashlib.sha256(bad).hexdigest()
    r = httpx.post(
        f"{hf.url}/acme/exp1.git/info/lfs/objects/batch",
        json={"operation": "upload", "transfers": ["basic", "multipart"], "objects": [{"oid": sha, "size": len(bad)}]},
        headers={"Authorization": f"Bearer {world.keys.trainer}"},
    )
    assert r.status_code == 200 and r.json()["transfer"] == "multipart"
    upload = r.json()["objects"][0]["actions"]["upload"]
    assert upload["header"]["chunk_size"] == str(5 * MiB)
    assert sorted(k for k in upload["header"] if k.isdigit()) == ["1", "2"]
    href = upload["href"]
    assert f"/info/lfs/complete/{carrier_id}/{sha}?token=" in href
    body = {"oid": sha, "parts": [{"partNumber": n, "etag": '"x"'} for n in (1, 2)]}
    other_ns = world.other.tenant_id
    _api(hf, world.keys.other_trainer).create_repo(f"{other_ns}/mine")
    for url, headers in (
        (href, {"Authorization": f"Bearer {world.keys.other_trainer}"}),  # another tenant's key
        (href.split("?token=")[0] + "?token=wrong", {}),
        (href.replace("/acme/exp1.git/", f"/{other_ns}/mine.git/"), {}),
    ):
        r = httpx.post(url, json=body, headers=headers)
        assert (r.status_code, r.headers.get("X-Error-Code")) == (404, "EntryNotFound"), r.text
    r = httpx.post(href, json=body)  # the right capability, but not the parts' etags
    assert r.status_code == 400 and "part 1's etag" in r.json()["message"]
    # bytes never pushed: a new multipart upload; completing it with nothing uploaded is refused
    fresh = hashlib.sha256(b"never pushed").hexdigest()
    r = httpx.post(
        f"{hf.url}/acme/exp1.git/info/lfs/objects/batch",
        json={"operation": "upload", "transfers": ["basic", "multipart"], "objects": [{"oid": fresh, "size": len(bad)}]},
        headers={"Authorization": f"Bearer {world.keys.trainer}"},
    )
    href = r.json()["objects"][0]["actions"]["upload"]["href"]
    assert f"/info/lfs/complete/{carrier_id}/" not in href  # a carrier of its own
    r = httpx.post(href, json={"oid": fresh, "parts": [{"partNumber": n, "etag": '"x"'} for n in (1, 2)]})
    assert r.status_code == 400 and "part 1 of 2 was never uploaded" in r.json()["message"]


def test_delete_inside_checkpoints_exact_quota_fit_and_no_pull_requests(ctx: Context, hf: Served, world: World) -> None:
    """issue 15, part 2. Single-file deletes: delete_file/delete_folder inside a ``files`` checkpoint
    make a new version without them (the last file gone: the folder goes); a missing file is 404
    EntryNotFound; inside an immutable Tinker checkpoint it is a permanent 400 with the Hub's
    X-Error-Message and changes nothing. Quota double count: with the quota at usage + the pushed
    bytes exactly, a create_commit succeeds (the commit's declare takes the LFS carrier's reservation
    over instead of counting the bytes twice); one byte more is refused. create_pr is refused (400)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import BadRequestError, RemoteEntryNotFoundError

    from weightstore import tenants
    from weightstore.models import Tenant

    api = _api(hf, world.keys.trainer)
    ops = [
        CommitOperationAdd("extra/a.json", b'{"a": 1}'),
        CommitOperationAdd("extra/b.json", b'{"b": 2}'),
        CommitOperationAdd("extra/sub/c.json", b'{"c": 3}'),
        CommitOperationAdd("extra/sub/d.json", b'{"d": 4}'),
    ]
    api.create_commit("acme/exp1", ops, commit_message="four files")

    def files_of(name: str) -> list[str] | None:
        ckpt = _ckpt(ctx, world.run_id, "files", name)
        if ckpt is None:
            return None
        with session_scope(ctx.engine) as s:
            return sorted(f.path for f in checkpoints.files_of(s, ckpt))

    first = _ckpt(ctx, world.run_id, "files", "extra")
    api.delete_file("extra/a.json", repo_id="acme/exp1")
    assert files_of("extra") == ["b.json", "sub/c.json", "sub/d.json"]
    second = _ckpt(ctx, world.run_id, "files", "extra")
    assert first is not None and second is not None and second.id != first.id  # a new version
    api.delete_folder("extra/sub", repo_id="acme/exp1")
    assert files_of("extra") == ["b.json"]
    assert "extra/a.json" not in {f.rfilename for f in api.model_info("acme/exp1").siblings or []}
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("extra/a.json", repo_id="acme/exp1")
    api.delete_file("extra/b.json", repo_id="acme/exp1")
    assert files_of("extra") is None  # its last file deleted: the folder is gone

    before = _ckpt(ctx, world.run_id, "sampler", "step-1")
    for call in (
        lambda: api.delete_file("sampler_weights/step-1/adapter_config.json", repo_id="acme/exp1"),
        lambda: api.delete_folder("sampler_weights/step-1/sub", repo_id="acme/exp1"),
    ):
        with pytest.raises(BadRequestError, match="never changes") as exc:
            call()
        assert exc.value.response.status_code == 400
        assert "never changes" in exc.value.response.headers["X-Error-Message"]
    after = _ckpt(ctx, world.run_id, "sampler", "step-1")
    assert before is not None and after is not None and after.id == before.id
    with pytest.raises(BadRequestError, match="pull requests are not supported"):
        api.create_commit("acme/exp1", [CommitOperationAdd("pr/x.json", b"{}")], commit_message="x", create_pr=True)
    assert files_of("pr") is None

    data = b"q" * 4096
    with session_scope(ctx.engine) as s:
        used = tenants.usage(s, "acme", now=ctx.clock.now()).used_bytes
        tenant = s.get(Tenant, "acme")
        assert tenant is not None
        tenant.quota_bytes = used + len(data)
        s.add(tenant)
    api.create_commit("acme/exp1", [CommitOperationAdd("fits/data.bin", data)], commit_message="exact fit")
    assert files_of("fits") == ["data.bin"]
    with session_scope(ctx.engine) as s:
        assert tenants.usage(s, "acme", now=ctx.clock.now()).used_bytes == used + len(data)
    with pytest.raises(BadRequestError, match="quota exceeded"):
        api.create_commit("acme/exp1", [CommitOperationAdd("over/x.bin", b"y")], commit_message="one byte over")
    assert files_of("over") is None


def test_a_create_repo_run_adopts_the_base_model_its_first_adapter_names(ctx: Context, hf: Served, world: World) -> None:
    """Left in stop 18: a run made by create_repo kept base model "unknown" forever, so an export of a
    pushed adapter always had to name its base. The first pushed adapter_config.json naming a Hub model
    id sets it (and the rank), once; a local path (what save_pretrained writes for a model loaded from
    disk), a non-string and a name too long for a run are not adopted; a later push changes nothing."""
    from huggingface_hub import CommitOperationAdd

    from weightstore import exportjobs
    from weightstore.models import TrainingRun

    files = peft_adapter_files(world.base_dir, seed=21)
    config = json.loads(files["adapter_config.json"])
    api = _api(hf, world.keys.trainer)
    api.create_repo("acme/adopt")

    def push(name: str, base: Any) -> None:
        cfg = {**config, "base_model_name_or_path": base}
        ops = [
            CommitOperationAdd(f"sampler_weights/{name}/adapter_model.safetensors", files["adapter_model.safetensors"]),
            CommitOperationAdd(f"sampler_weights/{name}/adapter_config.json", json.dumps(cfg).encode()),
        ]
        api.create_commit("acme/adopt", ops, commit_message=name)

    def run() -> tuple[str, int | None]:
        with session_scope(ctx.engine) as s:
            row = s.get(TrainingRun, "acme:adopt")
            assert row is not None
            return row.base_model, row.lora_rank

    for i, not_an_id in enumerate([str(world.base_dir), None, 7, "a/b/c", "org/" + "x" * 300, "bad--name"]):
        push(f"kept-{i}", not_an_id)
        assert run() == ("unknown", None)
    push("first", BASE)
    assert run() == (BASE, config["r"])
    push("second", "otherorg/other-base")
    assert run() == (BASE, config["r"])
    # an export of a pushed adapter now finds its base through the run, as for a native run
    job = exportjobs.submit(ctx, world.trainer, "tinker://acme:adopt/sampler_weights/second", target="peft")
    assert job.base_model == BASE


RETRY_PUTS = {"after the PUT": 0, "before the PUT": 1, "after a multipart upload": 0, "during a multipart upload": 2}
"""PUTs the retry sends: none for a staged object, the object again, or every part again."""


@pytest.mark.parametrize("broken", list(RETRY_PUTS))
def test_a_push_whose_commit_never_came_is_answered_from_its_reservation(
    ctx: Context, hf: Served, world: World, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """A push broke before its commit (the client died after its PUTs, or its PUT never arrived, or
    during or after a multipart upload): its LFS carrier keeps reserving those bytes until it expires
    (24 h). Pushed again with the quota fitting them once, the retry was refused for the quota (the
    second batch reserved them a second time). Now the retry is answered from that reservation: a
    staged object moves 0 bytes, an unstaged one is PUT again to the same staging key, an unfinished
    multipart upload gets fresh part URLs and a new completion token for the same upload; the carrier's
    expiry is extended; the commit succeeds and the bytes count once."""
    import huggingface_hub.lfs as lfs
    from huggingface_hub import CommitOperationAdd

    from weightstore import tenants
    from weightstore.models import Tenant

    big = "multipart" in broken
    if big:
        _lower_single_put(ctx, 5 * MiB)
    data = bytes(range(256)) * ((5 * MiB if big else 64 * 1024) // 256) + b"r" * 100
    with session_scope(ctx.engine) as s:
        used = tenants.usage(s, "acme", now=ctx.clock.now()).used_bytes
        tenant = s.get(Tenant, "acme")
        assert tenant is not None
        tenant.quota_bytes = used + len(data) + len(data) // 2  # fits once, not twice
        s.add(tenant)
    api = _api(hf, world.keys.trainer)

    if broken in ("before the PUT", "during a multipart upload"):
        real = lfs.http_backoff

        def refused(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            if method == "PUT" and (not big or "partNumber=2" in url):
                raise ConnectionError("injected: the connection broke before this PUT")
            return real(method, url, *args, **kwargs)

        monkeypatch.setattr(lfs, "http_backoff", refused)
        with pytest.raises(RuntimeError, match="Error while uploading"):
            api.preupload_lfs_files("acme/exp1", [CommitOperationAdd("retry/w.bin", data)])
        monkeypatch.setattr(lfs, "http_backoff", real)
    else:
        api.preupload_lfs_files("acme/exp1", [CommitOperationAdd("retry/w.bin", data)])  # the PUTs, no commit
    assert len(_carrier_rows(ctx)) == 1

    # The retry comes a minute before that carrier would expire; its commit comes after that moment:
    # answering from the carrier extended its expiry.
    clock.advance(ctx.settings.upload_expiry_seconds - 60)
    puts = PutCounter(monkeypatch)
    again = CommitOperationAdd("retry/w.bin", data)
    api.preupload_lfs_files("acme/exp1", [again])
    assert len(puts.puts) == RETRY_PUTS[broken]
    clock.advance(120)
    api.create_commit("acme/exp1", [again], commit_message="again")
    ckpt = _ckpt(ctx, world.run_id, "files", "retry")
    assert ckpt is not None
    with session_scope(ctx.engine) as s:
        assert {f.path: f.sha256 for f in checkpoints.files_of(s, ckpt)} == {"w.bin": hashlib.sha256(data).hexdigest()}
        assert tenants.usage(s, "acme", now=ctx.clock.now()).used_bytes == used + len(data)
    assert _carrier_rows(ctx) == []
