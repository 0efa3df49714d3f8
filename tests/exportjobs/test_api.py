"""End to end through HTTP and an in-process worker: register a base model with the CLI's upload
path, export PEFT and merged, load both with peft / transformers and compare logits."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from sqlmodel import select

from weightstore.client import Client
from weightstore.db import session_scope
from weightstore.models import Checkpoint
from weightstore.worker import start_in_process
from weightstore_cli.exports import upload_base_model, wait_for

from .builders import adapter_files, adapter_weights, reference_logits

TOKENS = torch.tensor([[1, 5, 9, 12, 33, 7, 2, 60]])


@pytest.fixture
def live(ctx):
    from tests.conftest import LiveServer

    srv = LiveServer(ctx, background=[lambda c: start_in_process(c, poll_seconds=0.2)]).start()
    yield srv
    srv.stop()


def test_export_peft_and_merged_through_api(ctx, live, keys, base_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    admin = Client(live.url, keys.admin)
    first = upload_base_model(admin, "tiny-llama", base_dir)
    assert first["name"] == "tiny-llama" and first["architecture"] == "LlamaForCausalLM"
    # a second name for the same bytes moves nothing and is registered at once
    second = upload_base_model(admin, "org/tiny-llama-copy", base_dir)
    assert second["size_bytes"] == first["size_bytes"]
    shown = admin._call("GET", "/v1/base-models/tiny-llama")
    assert "config.json" in {f["path"] for f in shown["files"]} and "README.md" not in {f["path"] for f in shown["files"]}
    # writes are admin-only
    trainer = Client(live.url, keys.trainer)
    r = trainer.http.delete("/v1/base-models/tiny-llama")
    assert r.status_code == 403

    run = trainer.create_run("tiny-llama", lora_rank=4)
    src = trainer.upload(run["run_id"], "sampler", "step-1", adapter_files())["tinker_path"]
    peft_job = trainer._call("POST", "/v1/exports", json={"source": src, "target": "peft"})
    merged_job = trainer._call("POST", "/v1/exports", json={"source": src, "target": "merged", "output_name": "step-1-merged"})
    assert peft_job["output_path"] == f"tinker://{run['run_id']}/external_weights/step-1"
    jobs = wait_for(trainer, [peft_job["job_id"], merged_job["job_id"]], progress=False, poll=0.2, timeout=240)
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"], [j["error"] for j in jobs]
    for j in jobs:
        assert j["progress_bytes"] == j["total_bytes"] > 0
        ver = j["verification"]["verification"]
        assert ver["noop"]["passed"] and ver["recompute"]["passed"]
    # the same request again: the same (finished) job, no new work
    again = trainer._call("POST", "/v1/exports", json={"source": src, "target": "peft"})
    assert again["job_id"] == peft_job["job_id"] and again["state"] == "succeeded"
    listed = trainer._call("GET", "/v1/exports")
    assert listed["total_count"] == 2
    # another tenant sees nothing
    other = httpx.get(f"{live.url}/v1/exports/{peft_job['job_id']}", headers={"X-API-Key": keys.other_trainer})
    assert other.status_code == 404

    peft_dir = trainer.download(jobs[0]["result"], tmp_path / "peft")
    merged_dir = trainer.download(jobs[1]["result"], tmp_path / "merged")
    expected = reference_logits(base_dir, adapter_weights(), TOKENS)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
        base_logits = base(TOKENS).logits
        peft_logits = PeftModel.from_pretrained(base, peft_dir).eval()(TOKENS).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()(TOKENS).logits
    assert not torch.allclose(base_logits, expected, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(peft_logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_logits, expected, atol=1e-4, rtol=1e-4)

    with session_scope(ctx.engine) as s:
        rows = {c.kind: c for c in s.exec(select(Checkpoint)).all()}
    assert rows["external"].exported_from_id == rows["sampler"].id == rows["merged"].exported_from_id

    # the base model is in use (the run's checkpoints name it): removal refused with a clear code
    r = admin.http.delete("/v1/base-models/tiny-llama")
    assert r.status_code == 400 and r.json()["code"] == "in_use"
    admin._call("DELETE", "/v1/base-models/org/tiny-llama-copy")
    assert [b["name"] for b in admin._call("GET", "/v1/base-models")["base_models"]] == ["tiny-llama"]


def test_batch_and_cancel_through_api(ctx, server, keys, base_dir: Path):
    admin = Client(server.url, keys.admin)
    upload_base_model(admin, "tiny-llama", base_dir)
    trainer = Client(server.url, keys.trainer)
    run = trainer.create_run("tiny-llama", lora_rank=4)
    for i in range(3):
        trainer.upload(run["run_id"], "sampler", f"step-{i}", adapter_files(seed=i + 1))
    res = trainer._call(
        "POST", "/v1/exports/batch", json={"target": "merged", "run_id": run["run_id"], "name_pattern": "step-[12]"}
    )
    assert sorted(j["output_path"].rsplit("/", 1)[1] for j in res["jobs"]) == ["step-1", "step-2"]
    assert {j["state"] for j in res["jobs"]} == {"queued"}  # no worker in this server
    job_id = res["jobs"][0]["job_id"]
    cancelled = trainer._call("POST", f"/v1/exports/{job_id}/cancel")
    assert cancelled["state"] == "cancelled"
    reader = httpx.post(f"{server.url}/v1/exports/{job_id}/cancel", headers={"X-API-Key": keys.reader})
    assert reader.status_code == 403
    by_batch = trainer._call("GET", "/v1/exports", params={"batch_id": res["batch_id"]})
    assert sorted(j["state"] for j in by_batch["jobs"]) == ["cancelled", "queued"]
    bad = httpx.post(
        f"{server.url}/v1/exports",
        headers={"X-API-Key": keys.trainer},
        json={"source": f"tinker://{run['run_id']}/sampler_weights/step-0", "target": "gguf"},
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_request"
