"""Save → list → download → delete through the Python client against a live server."""

from __future__ import annotations

import hashlib

import pytest

from weightstore.client import Client
from weightstore.errors import AlreadyExists, NotFound
from tests.helpers import sampler_files, state_files


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
