"""Every Tinker checkpoint route answers a checkpoint of a kind Tinker does not know (a Hub-pushed
``files`` folder; merged exports likewise) exactly as a missing one: 404, never a 500 from building
a Tinker answer for a kind outside its three (class flagged while building the Hub write side)."""

from __future__ import annotations

import pytest

from tests.api.test_bad_input import save

ROUTES = [
    ("DELETE", ""),
    ("PUT", "/ttl"),
    ("POST", "/publish"),
    ("DELETE", "/publish"),
    ("GET", "/archive"),
]


@pytest.mark.parametrize(("method", "suffix"), ROUTES)
def test_a_non_tinker_checkpoint_is_missing_on_every_tinker_route(api, method: str, suffix: str) -> None:  # type: ignore[no-untyped-def]
    run_id = api.post("/v1/runs", json={"base_model": "tiny-llama"}).json()["run_id"]
    r = save(api, run_id, {"notes.txt": b"hello"}, kind="files", name="folder")
    assert r.status_code == 200, r.text
    kwargs = {"json": {"ttl_seconds": 7200}} if suffix == "/ttl" else {}
    seen = api.request(method, f"/api/v1/training_runs/{run_id}/checkpoints/files/folder{suffix}", **kwargs)
    missing = api.request(method, f"/api/v1/training_runs/{run_id}/checkpoints/weights/absent{suffix}", **kwargs)
    assert seen.status_code == missing.status_code == 404, (seen.status_code, seen.text, missing.text)
    assert seen.json()["code"] == missing.json()["code"]
    assert api.get(f"/v1/checkpoints/{run_id}/files/folder").status_code == 200  # untouched
