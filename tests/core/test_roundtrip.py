"""Save → list → download → delete through the Python client against a live server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.helpers import sampler_files, state_files
from weightstore.client import Client
from weightstore.errors import AlreadyExists, NotFound


@pytest.mark.parametrize("transfer", ["stream", "presigned"])
def test_upload_download_roundtrip(server, keys, tmp_path, transfer):
    c = Client(server.url, keys.trainer, transfer=transfer)
    run = c.create_run("tiny-llama", lora_rank=4)
    files = state_files()
    res = c.upload(run["run_id"], "training", "step-1", files, ttl_seconds=7200)
    assert res["tinker_path"] == f"tinker://{run['run_id']}/weights/step-1"
    assert res["bytes_received"] == sum(len(b) for b in files.values())
    listed = c.list_checkpoints(run_id=run["run_id"])
    assert [x["tinker_path"] for x in listed["checkpoints"]] == [res["tinker_path"]]
    out = c.download(res["tinker_path"], tmp_path / "dl")
    for name, data in files.items():
        assert hashlib.sha256((out / name).read_bytes()).digest() == hashlib.sha256(data).digest()
    # same step's sampler weights dedup against the state's weights file: nothing moves
    again = c.upload(run["run_id"], "sampler", "step-1", sampler_files())
    assert again["bytes_received"] == 0
    with pytest.raises(AlreadyExists):
        c.upload(run["run_id"], "training", "step-1", files)
    c.delete(res["tinker_path"])
    with pytest.raises(NotFound):
        c.get_checkpoint(res["tinker_path"])


def test_download_starts_over_partial_files_it_has_no_journal_for(server, keys, tmp_path):
    """A ``.partial`` without its range journal says nothing about which bytes are good (issue 11,
    item 8): a truncated one and a garbage one are both replaced, never reported as corruption.
    Resuming from a journal is covered in test_download_resume.py."""
    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-llama")
    files = state_files(3)
    path = c.upload(run["run_id"], "training", "s", files)["tinker_path"]
    dest = tmp_path / "dl"
    dest.mkdir()
    opt = files["optimizer.safetensors"]
    for leftover in (opt[: len(opt) // 2], b"\xff" * len(opt)):
        (dest / "optimizer.safetensors").unlink(missing_ok=True)
        (dest / "optimizer.safetensors.partial").write_bytes(leftover)
        c.download(path, dest)
        assert (dest / "optimizer.safetensors").read_bytes() == opt
        assert not (dest / "optimizer.safetensors.partial").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)


def test_presigned_urls_are_short_lived_and_tamper_proof(server, keys, ctx):
    import time

    import httpx

    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-llama")
    path = c.upload(run["run_id"], "sampler", "s", sampler_files(4))["tinker_path"]
    url = c.file_urls(path)["files"][0]["url"]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url.replace("Signature=", "Signature=0")).status_code == 403
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    ctx.settings = ctx.settings.model_copy(update={"presign_ttl_seconds": 1})
    short = c.file_urls(path)["files"][0]
    assert "X-Amz-Expires=1" in short["url"]
    time.sleep(2.5)
    assert httpx.get(short["url"]).status_code == 403


def test_big_file_multipart_both_modes(server, keys, tmp_path, ctx):
    """Files over the multipart threshold (5 MiB in tests) go in parts, both ways, and dedup.
    Presigned files over the single-PUT limit (lowered here) go as parts to a staging key."""
    ctx.settings = ctx.settings.model_copy(update={"single_put_max_bytes": 5 * 1024 * 1024})
    import os

    big = {"adapter_model.safetensors": b"", "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'}
    import torch

    from weightstore import tensorio

    for seed, mode in enumerate(("stream", "presigned")):
        # different bytes per mode, or the second upload would dedup against the first
        w = torch.randn(3 * 1024 * 1024, generator=torch.Generator().manual_seed(seed))  # 12 MiB
        big["adapter_model.safetensors"] = tensorio.weights_bytes({"w": w})
        c = Client(server.url, keys.trainer, transfer=mode)
        run = c.create_run("tiny-llama")["run_id"]
        src = tmp_path / mode
        src.mkdir()
        for k, v in big.items():
            (src / k).write_bytes(v)
        res = c.upload_dir(src, run_id=run, kind="sampler", name="big")
        assert res["bytes_received"] >= len(big["adapter_model.safetensors"])  # the config dedups in round 2
        out = c.download(res["tinker_path"], tmp_path / f"out-{mode}")
        assert (out / "adapter_model.safetensors").read_bytes() == big["adapter_model.safetensors"]
        # parallel ranged GETs (1 MiB ranges here) give the same bytes
        ranged = Client(server.url, keys.trainer, range_part=1024 * 1024).download(res["tinker_path"], tmp_path / f"r-{mode}")
        assert (ranged / "adapter_model.safetensors").read_bytes() == big["adapter_model.safetensors"]
        assert os.path.getsize(out / "adapter_model.safetensors") > 10 * 2**20


def test_hash_cache_skips_rehashing_unchanged_files_and_notices_changes(tmp_path, monkeypatch):
    from weightstore import client as client_mod

    cache = client_mod.HashCache(tmp_path / "cache")
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    calls: list[Path] = []
    real = client_mod.sha256_file
    monkeypatch.setattr(client_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    first = cache.sha256(f)
    assert cache.sha256(f) == first and len(calls) == 1  # second time: from the cache
    f.write_bytes(b"b" * 1000)  # same size, new mtime: must re-hash
    assert cache.sha256(f) == (1000, hashlib.sha256(b"b" * 1000).hexdigest()) and len(calls) == 2
