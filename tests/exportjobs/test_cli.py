"""The CLI: local `convert`, and `base-models add` → `export --wait` → `exports show` against a live server."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from weightstore.client import Client
from weightstore_cli import app

from .builders import adapter_files
from .test_api import live  # noqa: F401 - fixture


def test_convert_locally(base_dir: Path, tmp_path: Path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, data in adapter_files().items():
        (adapter / name).write_bytes(data)
    res = CliRunner().invoke(
        app,
        [
            "convert",
            "--adapter",
            str(adapter),
            "--base",
            str(base_dir),
            "--to",
            "peft",
            str(tmp_path / "out"),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    bad = CliRunner().invoke(
        app, ["convert", "--adapter", str(adapter), "--base", str(base_dir), "--to", "gguf", str(tmp_path / "out2")]
    )
    assert bad.exit_code == 2


def test_cli_register_and_export_wait(live, keys, base_dir: Path):  # noqa: F811
    env = {"WEIGHTSTORE_URL": live.url, "WEIGHTSTORE_API_KEY": keys.admin}
    runner = CliRunner()
    res = runner.invoke(app, ["base-models", "add", "tiny-llama", str(base_dir), "--format", "json"], env=env)
    assert res.exit_code == 0, res.output
    trainer = Client(live.url, keys.trainer)
    run = trainer.create_run("tiny-llama", lora_rank=4)
    src = trainer.upload(run["run_id"], "sampler", "step-1", adapter_files())["tinker_path"]
    env["WEIGHTSTORE_API_KEY"] = keys.trainer
    res = runner.invoke(app, ["export", src, "--to", "merged", "--name", "m1", "--wait", "--format", "json"], env=env)
    assert res.exit_code == 0, res.output
    [job] = json.loads(res.stdout)
    assert job["state"] == "succeeded" and job["result"] == f"tinker://{run['run_id']}/merged_weights/m1"
    res = runner.invoke(app, ["exports", "show", job["job_id"]], env=env)
    assert res.exit_code == 0 and "check recompute" in res.stdout and "passed" in res.stdout
    res = runner.invoke(app, ["base-models", "rm", "tiny-llama", "-y"], env={**env, "WEIGHTSTORE_API_KEY": keys.admin})
    assert res.exit_code == 1 and "in_use" in res.output
