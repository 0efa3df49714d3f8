"""The ``tinker`` CLI (its own process, configured only by TINKER_BASE_URL / TINKER_API_KEY)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, timedelta
from pathlib import Path

import pytest

from weightstore import basemodels, exportjobs
from weightstore.client import Client

pytestmark = pytest.mark.timeout(300)
TINKER = str(Path(sys.executable).with_name("tinker"))


def run_cli(server, key: str, *args: str, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0", "HOME": str(tmp_path)}
    proc = subprocess.run([TINKER, *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_cli_list_info_ttl_delete_runs(server, keys, seeded, tmp_path, clock, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("each CLI call is a process start (slow); the SDK tests cover both backends")
    out = json.loads(run_cli(server, keys.trainer, "-f", "json", "checkpoint", "list", tmp_path=tmp_path).stdout)
    paths = [c["tinker_path"] for c in out["checkpoints"]]
    assert paths == [seeded.paths[k] for k in ("w2", "s1", "w1")]

    info = json.loads(
        run_cli(server, keys.trainer, "-f", "json", "checkpoint", "info", seeded.paths["w1"], tmp_path=tmp_path).stdout
    )
    assert info["tinker_path"] == seeded.paths["w1"] and info["lora_rank"] == 4 and info["is_lora"] is True

    run_cli(server, keys.trainer, "checkpoint", "set-ttl", seeded.paths["w1"], "--ttl", "7200", tmp_path=tmp_path)
    c = Client(server.url, keys.trainer)
    assert c.get_checkpoint(seeded.paths["w1"])["expires_at"] is not None
    run_cli(server, keys.trainer, "checkpoint", "set-ttl", seeded.paths["w1"], "--remove", tmp_path=tmp_path)
    assert c.get_checkpoint(seeded.paths["w1"])["expires_at"] is None
    bad = run_cli(server, keys.trainer, "checkpoint", "set-ttl", seeded.paths["w1"], "--ttl", "5", tmp_path=tmp_path, check=False)
    assert bad.returncode != 0

    runs = json.loads(run_cli(server, keys.trainer, "-f", "json", "run", "list", tmp_path=tmp_path).stdout)
    assert [r["training_run_id"] for r in runs["runs"]] == [seeded.run_id]

    # delete the weights/ checkpoints created before the second one (only step-1)
    cutoff = (clock.now() - timedelta(seconds=90)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    res = run_cli(
        server,
        keys.trainer,
        "-f",
        "json",
        "checkpoint",
        "delete",
        "--run-id",
        seeded.run_id,
        "--type",
        "weights",
        "--before",
        cutoff,
        "-y",
        tmp_path=tmp_path,
    )
    assert json.loads(res.stdout)["deleted_count"] == 1
    left = json.loads(run_cli(server, keys.trainer, "-f", "json", "checkpoint", "list", tmp_path=tmp_path).stdout)
    assert [x["tinker_path"] for x in left["checkpoints"]] == [seeded.paths["w2"], seeded.paths["s1"]]

    # another tenant's key sees nothing
    other = json.loads(run_cli(server, keys.other_trainer, "-f", "json", "checkpoint", "list", tmp_path=tmp_path).stdout)
    assert other["checkpoints"] == []


@pytest.fixture
def export_worker(ctx):  # type: ignore[no-untyped-def]
    """An export worker polling the queue in the background, as the embedded server runs one."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if exportjobs.run_one(ctx, owner="tinker-test-worker") is None:
                stop.wait(0.2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(timeout=60)


def test_cli_download_weights_checkpoint(ctx, server, keys, tmp_path, export_worker, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("the download flow is backend-independent; one backend keeps the suite short")
    from tests.exportjobs.builders import adapter_files, build_base
    from tests.exportjobs.conftest import principal_for
    from tests.helpers import state_files

    base_dir = build_base(tmp_path / "base" / "tiny-llama")
    basemodels.register(ctx, principal_for(ctx, keys.admin), "tiny-llama", base_dir)
    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-llama", lora_rank=4)
    files = {**adapter_files(1), "optimizer.safetensors": state_files()["optimizer.safetensors"]}
    path = c.upload(run["run_id"], "training", "final", files)["tinker_path"]

    res = run_cli(
        server, keys.trainer, "-f", "json", "checkpoint", "download", path, "-o", str(tmp_path / "dl"), tmp_path=tmp_path
    )
    dest = Path(json.loads(res.stdout)["destination"])
    assert dest.name == path.replace("tinker://", "").replace("/", "_")
    got = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(got)

    # byte-for-byte what a direct PEFT export of the same files gives
    adapter_dir, direct = tmp_path / "adapter", tmp_path / "direct"
    adapter_dir.mkdir()
    for name, data in files.items():
        (adapter_dir / name).write_bytes(data)
    exportjobs.convert("peft", adapter_dir, base_dir, direct, base_name="tiny-llama")
    for p in direct.iterdir():
        assert got[p.name] == p.read_bytes(), p.name

    # and peft loads it on the base model
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), dest)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)

    # the temporary export in the session's run is gone; the session is finished
    listed = c.list_checkpoints()["checkpoints"]
    assert not any(x["tinker_path"].endswith("/external_weights/download") for x in listed)
