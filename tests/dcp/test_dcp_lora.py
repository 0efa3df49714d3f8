"""DCP checkpoints of LoRA adapters export like Tinker ones; what cannot, and Tinker's load of a DCP
checkpoint, are refused with a clear permanent error (issue 14, part 2). Live server + SeaweedFS,
the export job run in this process (``exportjobs.run_one``), SQLite catalog."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.exportjobs.builders import ALPHA, RANK, adapter_weights, build_base, reference_logits
from weightstore import basemodels, exportjobs
from weightstore.client import Client
from weightstore.db import session_scope
from weightstore.errors import InvalidRequest
from weightstore.integrations.dcp import WeightstoreStorageWriter
from weightstore.integrations.dcp_lora import lora_keys
from weightstore.models import ExportJob

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

BASE = "tiny-llama"
TOKENS = torch.tensor([[1, 5, 9, 12, 33, 7, 2, 60]])
CONFIG = {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": BASE}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("base") / BASE)


def peft_trainer_state(seed: int = 1) -> dict[str, object]:
    """What an FSDP/PEFT trainer hands ``dcp.save``: the PeftModel's state dict (adapter factors with
    PEFT's adapter name, a frozen base weight) and FQN-keyed optimizer state of the factors."""
    lora = {k.replace(".weight", ".default.weight"): v for k, v in adapter_weights(seed).items()}
    model = {**lora, "base_model.model.model.embed_tokens.weight": torch.randn(64, 32)}
    optim = {"state": {k: {"exp_avg": torch.ones_like(v), "step": torch.tensor(3.0)} for k, v in lora.items()}}
    return {"model": model, "optim": optim}


def _register(ctx, keys, base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from weightstore import auth

    with session_scope(ctx.engine) as s:
        admin = auth.authenticate(s, keys.admin, now=ctx.clock.now())
    basemodels.register(ctx, admin, BASE, base_dir)


def _job(ctx, job_id: str) -> ExportJob:  # type: ignore[no-untyped-def]
    with session_scope(ctx.engine) as s:
        job = s.get(ExportJob, job_id)
        assert job is not None
        return job


@SQLITE_ONLY
def test_dcp_lora_adapter_exports_to_peft_equal_to_the_reference(ctx, server, keys, base_dir, tmp_path, monkeypatch):
    """issue 14, part 2 item 2: a PEFT trainer's state (adapter factors named as PeftModel names
    them, a frozen base weight, optimizer state) saved by DCP with its adapter_config exports through
    the ordinary export path; PeftModel.from_pretrained of the output gives the reference logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _register(ctx, keys, base_dir)
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run(BASE, lora_rank=RANK)["run_id"]
    w = WeightstoreStorageWriter(
        url=server.url, api_key=keys.trainer, run_id=run, name="step-1", adapter_config=CONFIG, file_bytes=4096
    )
    dcp.save(peft_trainer_state(), storage_writer=w)
    path = w.tinker_path or ""
    assert c.get_checkpoint(path)["layout"] == "dcp"
    job = c._call("POST", "/v1/exports", json={"source": path, "target": "peft"})
    fetched: list[str] = []
    real_fetch = exportjobs.blobs.fetch_to_file

    def fetch(ctx, sha, size, dest, **kw):  # type: ignore[no-untyped-def]
        fetched.append(dest.name)
        return real_fetch(ctx, sha, size, dest, **kw)

    monkeypatch.setattr(exportjobs.blobs, "fetch_to_file", fetch)
    assert exportjobs.run_one(ctx, "test-worker") == "succeeded", _job(ctx, job["job_id"]).error
    data_files = {f["path"] for f in c.get_checkpoint(path)["files"] if f["path"].endswith(".distcp")}
    read = {f for f in fetched if f.endswith(".distcp")}
    assert {".metadata", "adapter_config.json"} <= set(fetched) and read < data_files  # not the frozen/optimizer files
    row = _job(ctx, job["job_id"])
    assert row.progress_bytes == row.total_bytes  # the files it did not need count as done
    out = c.download(job["output_path"], tmp_path / "peft")
    expected = reference_logits(base_dir, adapter_weights(1), TOKENS)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
        base_logits = base(TOKENS).logits
        got = PeftModel.from_pretrained(base, out).eval()(TOKENS).logits
    assert not torch.allclose(base_logits, expected, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@SQLITE_ONLY
def test_dcp_checkpoints_that_are_not_exportable_adapters_are_refused(ctx, server, keys, base_dir):
    """issue 14, part 2 item 2: no adapter_config → 400 invalid_request at submission (and left out
    of a batch by filter); a config but no LoRA tensors → the job fails with invalid_request
    (permanent, not retried)."""
    _register(ctx, keys, base_dir)
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run(BASE, lora_rank=RANK)["run_id"]
    bare = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="bare")
    dcp.save(peft_trainer_state(), storage_writer=bare)
    r = httpx.post(
        f"{server.url}/v1/exports", json={"source": bare.tinker_path, "target": "peft"}, headers={"X-API-Key": keys.trainer}
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert "no adapter_config.json" in r.json()["message"]

    plain = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="plain", adapter_config=CONFIG)
    dcp.save({"model": {"w": torch.ones(4, 4)}}, storage_writer=plain)
    # a batch by filter skips the DCP checkpoint that is no adapter and queues the other
    batch = c._call("POST", "/v1/exports/batch", json={"target": "merged", "run_id": run})
    assert [j["source"] for j in batch["jobs"]] == [plain.tinker_path]
    assert exportjobs.run_one(ctx, "test-worker") == "failed"
    row = _job(ctx, batch["jobs"][0]["job_id"])
    assert row.state == "failed" and row.attempts == 1 and row.result_checkpoint_id is None
    assert row.error is not None and row.error["code"] == "invalid_request"
    assert "holds no LoRA adapter tensors" in row.error["message"]


def test_lora_key_naming_accepted_and_refused():
    """issue 14, part 2 item 2: Tinker's and PEFT's names under one prefix map to Tinker keys;
    other parameters and optimizer state are ignored; other namings and mixtures are refused."""
    mod = "model.layers.0.self_attn.q_proj"
    assert lora_keys([f"base_model.model.{mod}.lora_A.weight", f"base_model.model.{mod}.lora_B.weight"]) == {
        f"base_model.model.{mod}.lora_A.weight": f"base_model.model.{mod}.lora_A.weight",
        f"base_model.model.{mod}.lora_B.weight": f"base_model.model.{mod}.lora_B.weight",
    }
    peft = [f"model.base_model.model.{mod}.lora_{h}.default.weight" for h in "AB"]
    ignored = ["model.base_model.model.lm_head.weight", f"optim.state.{peft[0]}.exp_avg"]
    assert sorted(lora_keys([*peft, *ignored]).values()) == [f"base_model.model.{mod}.lora_{h}.weight" for h in "AB"]
    refused = {
        "unknown naming": [f"{mod}.lora_A.weight", f"{mod}.lora_B.weight"],
        "several prefixes": [*peft, *(f"ema.base_model.model.{mod}.lora_{h}.default.weight" for h in "AB")],
        "one half": [peft[0]],
        "embedding": [*peft, "model.base_model.model.model.embed_tokens.lora_embedding_A.default"],
        "no lora": ["model.w"],
    }
    for why, keys in refused.items():
        with pytest.raises(InvalidRequest):
            lora_keys(keys)
            pytest.fail(why)


@SQLITE_ONLY
def test_tinker_load_of_a_dcp_checkpoint_is_refused(server, keys, api):
    """issue 14, part 2 item 3: Tinker's load_state (create-via-load) needs Tinker full state; a DCP
    checkpoint is refused with 400 invalid_request naming dcp.load, and so is Client.load_state."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run(BASE)["run_id"]
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="s")
    dcp.save({"x": torch.arange(4.0)}, storage_writer=w)
    sid = api.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
    r = api.post("/api/v1/load_weights", json={"session_id": sid, "model_seq_id": 1, "path": w.tinker_path, "optimizer": True})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert "PyTorch Distributed Checkpoint" in r.json()["message"] and "dcp.load" in r.json()["message"]
    with pytest.raises(InvalidRequest, match="PyTorch Distributed Checkpoint"):
        c.load_state(w.tinker_path or "")
