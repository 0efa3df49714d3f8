"""The real ``tinker`` SDK's RestClient against a live weightstore: runs, checkpoints, TTL,
publish, delete, weights info, tenant isolation."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
import tinker

from tests.helpers import sampler_files
from weightstore.client import Client

pytestmark = pytest.mark.timeout(180)


def test_training_runs_paging_and_fields(server, keys, sdk, other_sdk, seeded, clock):
    c = Client(server.url, keys.trainer)
    extra = []
    for i in range(3):
        clock.advance(1)
        extra.append(c.create_run("tiny-qwen", run_id=f"sess-{i}:train:0")["run_id"])
    seen, offset = [], 0
    while True:
        page = sdk.list_training_runs(limit=2, offset=offset).result(timeout=30)
        assert page.cursor.total_count == 4 and page.cursor.limit == 2 and page.cursor.offset == offset
        seen += [r.training_run_id for r in page.training_runs]
        if len(page.training_runs) < 2:
            break
        offset += 2
    assert seen == list(reversed(extra)) + [seeded.run_id]  # newest first, across 2 pages

    run = sdk.get_training_run(seeded.run_id).result(timeout=30)
    assert run.training_run_id == seeded.run_id and run.base_model == "tiny-llama"
    assert run.model_owner == "acme" and run.is_lora and run.lora_rank == 4
    assert run.last_checkpoint.tinker_path == seeded.paths["w2"]
    assert run.last_sampler_checkpoint.tinker_path == seeded.paths["s1"]
    assert run.user_metadata == {"renderer_name": "llama3"}
    assert run.last_request_time.tzinfo is not None
    by_path = sdk.get_training_run_by_tinker_path(seeded.paths["w1"]).result(timeout=30)
    assert by_path.training_run_id == seeded.run_id
    # colons in run ids travel unencoded; a chosen id lands in the tenant's namespace (issue 11, item 1)
    assert extra[0] == "acme:sess-0:train:0"
    assert sdk.get_training_run(extra[0]).result(timeout=30).base_model == "tiny-qwen"

    # another tenant sees nothing and gets NotFound at once
    assert other_sdk.list_training_runs().result(timeout=30).training_runs == []
    assert other_sdk.list_training_runs(access_scope="accessible").result(timeout=30).cursor.total_count == 0
    with server.answered_without_retries():
        with pytest.raises(tinker.NotFoundError):
            other_sdk.get_training_run(seeded.run_id).result(timeout=30)
        with pytest.raises(tinker.NotFoundError):
            other_sdk.list_checkpoints(seeded.run_id).result(timeout=30)
        with pytest.raises(tinker.NotFoundError):
            other_sdk.delete_checkpoint_from_tinker_path(seeded.paths["w1"]).result(timeout=30)
        with pytest.raises(tinker.NotFoundError):
            other_sdk.get_weights_info_by_tinker_path(seeded.paths["w1"]).result(timeout=30)


def test_checkpoint_lists(sdk, seeded):
    listed = sdk.list_checkpoints(seeded.run_id).result(timeout=30)
    assert listed.cursor is None
    assert [c.tinker_path for c in listed.checkpoints] == [seeded.paths[k] for k in ("w2", "s1", "w1")]
    w1 = listed.checkpoints[-1]
    assert w1.checkpoint_id == "weights/step-1" and w1.checkpoint_type == "training"
    assert w1.tinker_path == f"tinker://{seeded.run_id}/weights/step-1"
    assert w1.size_bytes == sum(len(b) for b in __import__("tests.helpers").helpers.state_files(1).values())
    assert w1.time.tzinfo is not None and w1.public is False and w1.expires_at is None
    assert listed.checkpoints[1].checkpoint_type == "sampler"

    first = sdk.list_user_checkpoints(limit=2, offset=0).result(timeout=30)
    second = sdk.list_user_checkpoints(limit=2, offset=2).result(timeout=30)
    assert first.cursor.total_count == 3 and second.cursor.offset == 2
    assert [c.tinker_path for c in first.checkpoints + second.checkpoints] == [seeded.paths[k] for k in ("w2", "s1", "w1")]


def test_ttl_set_remove_and_range(server, sdk, seeded, clock):
    path = seeded.paths["s1"]
    sdk.set_checkpoint_ttl_from_tinker_path(path, 7200).result(timeout=30)
    ckpt = next(c for c in sdk.list_checkpoints(seeded.run_id).result(timeout=30).checkpoints if c.tinker_path == path)
    assert ckpt.expires_at == clock.now() + timedelta(seconds=7200)
    sdk.set_checkpoint_ttl_from_tinker_path(path, None).result(timeout=30)
    ckpt = next(c for c in sdk.list_checkpoints(seeded.run_id).result(timeout=30).checkpoints if c.tinker_path == path)
    assert ckpt.expires_at is None
    with server.answered_without_retries():
        for bad in (60, 10 * 365 * 24 * 3600 + 1):
            with pytest.raises(tinker.BadRequestError, match="out of range"):
                sdk.set_checkpoint_ttl_from_tinker_path(path, bad).result(timeout=30)
    # expiry makes it vanish from every list at once
    sdk.set_checkpoint_ttl_from_tinker_path(path, 3600).result(timeout=30)
    clock.advance(3601)
    assert path not in [c.tinker_path for c in sdk.list_checkpoints(seeded.run_id).result(timeout=30).checkpoints]


def test_delete(server, sdk, seeded):
    sdk.delete_checkpoint_from_tinker_path(seeded.paths["w1"]).result(timeout=30)
    left = [c.tinker_path for c in sdk.list_checkpoints(seeded.run_id).result(timeout=30).checkpoints]
    assert left == [seeded.paths["w2"], seeded.paths["s1"]]
    with server.answered_without_retries(), pytest.raises(tinker.NotFoundError):
        sdk.delete_checkpoint_from_tinker_path(seeded.paths["w1"]).result(timeout=30)


def test_publish_unpublish_and_accessible_scope(server, keys, sdk, other_sdk, seeded):
    path = seeded.paths["s1"]
    sdk.publish_checkpoint_from_tinker_path(path).result(timeout=30)
    assert {c.tinker_path: c.public for c in sdk.list_checkpoints(seeded.run_id).result(timeout=30).checkpoints}[path]
    # Tinker's contract: 409 when already public. (The SDK itself retries 409 for ~5 minutes, so
    # the status is checked on the wire; we also send x-should-retry: false.)
    url = f"{server.url}/api/v1/training_runs/{seeded.run_id}/checkpoints/sampler_weights/step-1/publish"
    r = httpx.post(url, headers={"X-API-Key": keys.trainer})
    assert r.status_code == 409 and r.headers["x-should-retry"] == "false" and r.json()["code"] == "conflict"

    # the other tenant: the run is accessible (only through its published checkpoint), not owned
    assert other_sdk.list_training_runs().result(timeout=30).cursor.total_count == 0
    acc = other_sdk.list_training_runs(access_scope="accessible").result(timeout=30)
    assert [r.training_run_id for r in acc.training_runs] == [seeded.run_id]
    assert acc.training_runs[0].last_checkpoint is None  # weights/ checkpoints stay private
    assert acc.training_runs[0].user_metadata is None
    assert [c.tinker_path for c in other_sdk.list_checkpoints(seeded.run_id).result(timeout=30).checkpoints] == [path]
    assert other_sdk.get_training_run(seeded.run_id, access_scope="accessible").result(timeout=30).base_model
    info = other_sdk.get_weights_info_by_tinker_path(path).result(timeout=30)
    assert info.base_model == "tiny-llama" and info.lora_rank == 4
    assert other_sdk.list_user_checkpoints().result(timeout=30).checkpoints == []
    with server.answered_without_retries():
        with pytest.raises(tinker.NotFoundError):  # only the owner may (un)publish
            other_sdk.unpublish_checkpoint_from_tinker_path(path).result(timeout=30)
        with pytest.raises(tinker.NotFoundError):
            other_sdk.publish_checkpoint_from_tinker_path(seeded.paths["w1"]).result(timeout=30)
        with pytest.raises(tinker.NotFoundError):
            other_sdk.set_checkpoint_ttl_from_tinker_path(path, 7200).result(timeout=30)

    sdk.unpublish_checkpoint_from_tinker_path(path).result(timeout=30)
    r = httpx.delete(url, headers={"X-API-Key": keys.trainer})
    assert r.status_code == 409
    assert other_sdk.list_training_runs(access_scope="accessible").result(timeout=30).training_runs == []
    with pytest.raises(tinker.NotFoundError):
        other_sdk.get_weights_info_by_tinker_path(path).result(timeout=30)


def test_weights_info(sdk, server, keys):
    c = Client(server.url, keys.trainer)
    run = c.create_run("Qwen/Qwen3-8B", lora_rank=4, train_mlp=False)
    path = c.upload(run["run_id"], "sampler", "s", sampler_files(3))["tinker_path"]
    info = sdk.get_weights_info_by_tinker_path(path).result(timeout=30)
    # from adapter_config.json: r=4, target_modules q_proj/v_proj (attention only)
    assert (info.base_model, info.is_lora, info.lora_rank) == ("Qwen/Qwen3-8B", True, 4)
    assert (info.train_attn, info.train_mlp, info.train_unembed) == (True, False, False)
    assert info.optimizer_config.type == "adamw"
    r = httpx.post(f"{server.url}/api/v1/weights_info", json={"tinker_path": "s3://x"}, headers={"X-API-Key": keys.trainer})
    assert r.status_code == 400 and r.json()["code"] == "invalid_path"


def test_client_config_and_bad_key(server):
    r = httpx.post(
        f"{server.url}/api/v1/client/config", json={"sdk_version": tinker.__version__}, headers={"X-API-Key": "tml-nope"}
    )
    assert r.status_code == 401
    with server.answered_without_retries(), pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=server.url, api_key="tml-not-a-key").list_training_runs().result(timeout=30)


def test_the_no_retry_check_sees_what_the_sdk_would_retry(server, keys, seeded):
    """``answered_without_retries`` (used above instead of wall-clock bounds) fails on a 409 answer
    and on a request marked as an SDK retry, and passes on a plain 404."""
    url = f"{server.url}/api/v1/training_runs/{seeded.run_id}/checkpoints/sampler_weights/step-1/publish"
    headers = {"X-API-Key": keys.trainer}
    assert httpx.post(url, headers=headers).status_code == 204
    with pytest.raises(AssertionError, match="409"), server.answered_without_retries():
        assert httpx.post(url, headers=headers).status_code == 409
    with pytest.raises(AssertionError, match="retry_count='1'"), server.answered_without_retries():
        httpx.get(f"{server.url}/healthz", headers={"x-stainless-retry-count": "1"})
    with server.answered_without_retries() as seen:
        assert httpx.get(f"{server.url}/api/v1/training_runs/nope", headers=headers).status_code == 404
    assert [(s.method, s.status) for s in seen] == [("GET", 404)]
