"""The Python client over several API replicas (issue 13, found 8): failover on connection errors and
502/503/504, retries of idempotent calls only, ``Retry-After`` honoured, typed errors after a deadline.
Real uvicorn replicas over one catalog and bucket (``conftest.replicas``); the retry rule's corner cases
against ``httpx.MockTransport``."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import httpx
import pytest
import torch

from tests.client._tcpproxy import TcpProxy
from tests.helpers import sampler_files
from weightstore import tensorio
from weightstore.client import Client
from weightstore.db import session_scope
from weightstore.errors import CatalogBusy, ServiceUnavailable, TransientError
from weightstore.models import Upload, UploadState


def _client(urls: list[str], key: str, **kw: Any) -> Client:
    kw.setdefault("retry_deadline", 20)
    return Client(urls, key, transfer="stream", hash_cache=False, progress=False, **kw)


def test_base_urls_from_a_list_a_comma_string_or_the_environment(monkeypatch):
    """issue 13, found 8: one base URL only."""
    assert Client(["http://a:1/", "http://b:2"], "k").base_urls == ["http://a:1", "http://b:2"]
    assert Client("http://a:1, http://b:2/", "k").base_urls == ["http://a:1", "http://b:2"]
    monkeypatch.setenv("WEIGHTSTORE_URL", "http://c:3,http://d:4")
    assert Client(api_key="k").base_urls == ["http://c:3", "http://d:4"]


def test_client_continues_through_the_other_replica_when_one_is_killed(replicas, keys):
    """issue 13, found 8: with one replica killed, every call (reads, a save, a load) goes on through
    the other; on HEAD the next call raised a raw ``httpx.ConnectError``."""
    r1, r2 = replicas
    c = _client([r1.url, r2.url], keys.trainer)
    run_id = c.create_run("tiny")["run_id"]
    first = c.upload(run_id, "sampler", "before", sampler_files(1))["tinker_path"]
    assert r2.proxy.connections == 0  # everything so far went to the first replica
    r1.proxy.kill()
    assert [r["run_id"] for r in c.list_runs()["runs"]] == [run_id]
    second = c.upload(run_id, "sampler", "after", sampler_files(2))["tinker_path"]
    assert c.base_urls[c._current] == r2.url
    for path, seed in ((first, 1), (second, 2)):
        assert {f: c.read_file(path, f) for f in sampler_files(seed)} == sampler_files(seed)


def test_stream_upload_survives_its_replica_dying_mid_body(replicas, keys):
    """issue 13, found 8 (and found 4: the upload declared on the dead replica is sent, committed and
    closed through the other): the replica is cut after 2 MiB of an 8 MiB streamed file."""
    r1, r2 = replicas
    c = _client([r1.url, r2.url], keys.trainer)
    run_id = c.create_run("tiny")["run_id"]
    dying = TcpProxy(r1.server.port, kill_after_upstream_bytes=2 * 1024 * 1024)
    c.base_urls = [dying.url, r2.url]
    c._current = 0
    weights = {f"base_model.model.layers.{i}.q_proj.lora_A.weight": torch.full((4, 131072), float(i)) for i in range(4)}
    files = {"adapter_model.safetensors": tensorio.weights_bytes(weights), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'}
    assert len(files["adapter_model.safetensors"]) > 8 * 1024 * 1024
    path = c.upload(run_id, "sampler", "big", files)["tinker_path"]
    assert dying.killed.is_set() and c.base_urls[c._current] == r2.url
    got = c.read_file(path, "adapter_model.safetensors")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()


def test_all_replicas_down_raises_the_typed_error_after_the_deadline(replicas, keys):
    """issue 13, found 8: no replica answers → ``ServiceUnavailable`` (a ``TransientError`` and a
    ``ConnectionError``) once ``retry_deadline`` has passed, naming every replica."""
    r1, r2 = replicas
    c = _client([r1.url, r2.url], keys.trainer, retry_deadline=1.5)
    r1.proxy.kill()
    r2.proxy.kill()
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        c.list_runs()
    assert time.monotonic() - start >= 1.5  # the whole budget was used (a stop-18 CI run gave up at 0.71 s)
    assert isinstance(caught.value, TransientError) and isinstance(caught.value, ConnectionError)
    assert caught.value.retryable and r1.url in caught.value.message and r2.url in caught.value.message
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_a_call_that_may_have_been_applied_is_not_sent_again(replicas, keys, ctx):
    """issue 13, found 8: ``POST /v1/runs`` cut after its first bytes reached a replica raises at once
    and is never sent to the other replica (it might create a second run)."""
    r1, r2 = replicas
    cut = TcpProxy(r1.server.port, kill_after_upstream_bytes=1)
    c = _client([cut.url, r2.url], keys.trainer)
    with pytest.raises(ServiceUnavailable, match="may or may not have been applied"):
        c.create_run("tiny")
    assert r2.proxy.connections == 0


def test_commit_is_idempotent_across_replicas(replicas, keys):
    """issue 13, found 8: a commit whose answer was lost is sent again, maybe to another replica; on
    HEAD the second commit answered 400 ``upload_expired`` ("upload ... is committed")."""
    r1, r2 = replicas
    h1 = httpx.Client(base_url=r1.url, headers={"X-API-Key": keys.trainer}, timeout=30)
    h2 = httpx.Client(base_url=r2.url, headers={"X-API-Key": keys.trainer}, timeout=30)
    run_id = h1.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
    files = sampler_files(3)
    declared = [{"path": p, "size_bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in files.items()]
    up = h1.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "c", "files": declared}).json()
    for f in up["files"]:
        assert h1.put(f"/v1/uploads/{up['upload_id']}/files/{f['path']}", content=files[f["path"]]).status_code == 200
    first = h1.post(f"/v1/uploads/{up['upload_id']}/commit")
    again = h2.post(f"/v1/uploads/{up['upload_id']}/commit")
    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json()["checkpoint"] == first.json()["checkpoint"]
    assert again.json()["tinker_path"] == first.json()["tinker_path"]
    assert again.json()["bytes_received"] == first.json()["bytes_received"] == sum(len(b) for b in files.values())


def test_abort_through_another_replica(replicas, keys, ctx):
    """issue 13, found 4: an upload declared through replica 1 is aborted through replica 2."""
    r1, r2 = replicas
    h1 = httpx.Client(base_url=r1.url, headers={"X-API-Key": keys.trainer}, timeout=30)
    h2 = httpx.Client(base_url=r2.url, headers={"X-API-Key": keys.trainer}, timeout=30)
    run_id = h1.post("/v1/runs", json={"base_model": "tiny"}).json()["run_id"]
    files = sampler_files(4)
    declared = [{"path": p, "size_bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in files.items()]
    up = h1.post("/v1/uploads", json={"run_id": run_id, "kind": "sampler", "name": "a", "files": declared}).json()
    assert up["lease_seconds"] == ctx.settings.upload_lease_seconds
    r1.proxy.kill()
    assert h2.delete(f"/v1/uploads/{up['upload_id']}").status_code == 204
    with session_scope(ctx.engine) as s:
        upload = s.get(Upload, up["upload_id"])
        assert upload is not None and upload.state == UploadState.aborted


# --- the retry rule, against scripted answers ----------------------------------------------------


def _scripted(answers: list[Any], **kw: Any) -> tuple[Client, list[httpx.Request]]:
    """A client whose transport plays ``answers`` in order (a response or an exception to raise)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    c = Client(kw.pop("urls", ["http://one", "http://two"]), "tml-x", hash_cache=False, **kw)
    c.http = httpx.Client(transport=httpx.MockTransport(handler))
    return c, seen


def _busy(retry_after: str = "1") -> httpx.Response:
    return httpx.Response(503, json={"code": "catalog_busy", "message": "busy"}, headers={"Retry-After": retry_after})


def test_retry_after_is_honoured_for_idempotent_calls():
    """issue 13, found 8: a 503 with ``Retry-After: 1`` is retried after at least 1 s, on the next replica."""
    c, seen = _scripted([_busy("1"), _busy("1"), httpx.Response(200, json={"runs": []})], retry_deadline=30)
    start = time.monotonic()
    assert c.list_runs() == {"runs": []}
    assert time.monotonic() - start >= 1.0
    assert [r.url.host for r in seen] == ["one", "two", "one"]


def test_non_idempotent_call_gets_the_services_typed_error_without_a_retry():
    """issue 13, found 8: ``POST /v1/runs`` answered 503 ``catalog_busy`` is not repeated (the rule:
    not safe once it reached a server); the caller gets ``CatalogBusy``."""
    c, seen = _scripted([_busy("1")], retry_deadline=30)
    with pytest.raises(CatalogBusy):
        c.create_run("tiny")
    assert len(seen) == 1


def test_a_call_never_sent_is_sent_again_even_if_not_idempotent():
    """issue 13, found 8: a refused connection never reached a server: ``POST /v1/runs`` goes to the next."""
    c, seen = _scripted([httpx.ConnectError("refused"), httpx.Response(201, json={"run_id": "r"})], retry_deadline=5)
    assert c.create_run("tiny") == {"run_id": "r"}
    assert [r.url.host for r in seen] == ["one", "two"]


def test_gateway_errors_become_service_unavailable_after_the_deadline():
    """issue 13, found 8: a load balancer's bare 502/504 is retried, then raised typed (not ``WeightstoreError``)."""
    c, seen = _scripted([httpx.Response(502), httpx.Response(504)] * 50, retry_deadline=0.5)
    with pytest.raises(ServiceUnavailable):
        c.list_runs()
    assert len(seen) >= 2


def test_a_repeated_delete_that_finds_nothing_was_done_by_the_first_attempt():
    """issue 13, found 8: the first DELETE's answer was lost (the connection broke after sending); the
    repeat finds nothing to delete: done, not ``NotFound``."""
    c, seen = _scripted([httpx.ReadError("reset"), httpx.Response(404, json={"code": "not_found", "message": "x"})])
    c.delete("tinker://run-1/sampler_weights/a")
    assert len(seen) == 2


def test_base_model_upload_survives_its_replica_dying_mid_body(replicas, keys, tmp_path):
    """issue 13 (left in stop 17): ``weightstore base add`` sent each file with a bare PUT to the first
    replica; a replica dying mid-body failed the command. It now goes through the client's failover like
    every other call (a PUT of content-addressed bytes is safe to repeat)."""
    import json

    from weightstore_cli.exports import upload_base_model

    r1, r2 = replicas
    c = _client([r1.url, r2.url], keys.admin)
    model = tmp_path / "tiny"
    model.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "vocab_size": 4096}
    (model / "config.json").write_text(json.dumps(config))
    embed = torch.arange(4096 * 512, dtype=torch.float32).reshape(4096, 512)
    weights = tensorio.weights_bytes({"model.embed_tokens.weight": embed})
    (model / "model.safetensors").write_bytes(weights)
    dying = TcpProxy(r1.server.port, kill_after_upstream_bytes=2 * 1024 * 1024)
    c.base_urls = [dying.url, r2.url]
    c._current = 0
    row = upload_base_model(c, "tinyorg/failover", model)
    assert dying.killed.is_set() and c.base_urls[c._current] == r2.url
    assert row["name"] == "tinyorg/failover" and row["size_bytes"] == len(weights) + (model / "config.json").stat().st_size


class _VirtualClock:
    """``time`` for ``weightstore.client``: ``sleep`` advances ``monotonic`` instead of waiting, so
    the retry loop's arithmetic is checked exactly, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


FAILURES = {
    "connection refused": lambda: httpx.ConnectError("refused"),
    "connection reset after sending": lambda: httpx.ReadError("reset"),
    "bad gateway": lambda: httpx.Response(502),
    "gateway timeout": lambda: httpx.Response(504),
    "catalog busy, Retry-After longer than the budget": lambda: _busy("1000"),
    "catalog busy, Retry-After 1": lambda: _busy("1"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("budget", [0.5, 1.5, 7.0, 60.0])
def test_the_client_uses_its_whole_retry_budget_and_never_sleeps_past_it(monkeypatch, failure, budget):
    """CI on stop 18: with every replica down and ``retry_deadline=1.5`` the client gave up after
    0.71 s, because it raised as soon as its next (jittered) back-off would end past the deadline. The
    class: any failure the client retries must be retried until the deadline, with the last attempt at
    the deadline, and no wait may run past it. Checked on a virtual clock for every failure kind and
    several budgets, so a replica that comes back just before the deadline is always reached."""
    import weightstore.client as client_module

    clock = _VirtualClock()
    monkeypatch.setattr(client_module, "time", clock)
    start = clock.now
    attempts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(clock.now - start)
        answer = FAILURES[failure]()
        if isinstance(answer, Exception):
            raise answer
        return answer

    c = Client(["http://one", "http://two"], "tml-x", hash_cache=False, retry_deadline=budget)
    c.http = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises((ServiceUnavailable, CatalogBusy)) as caught:
        c.list_runs()
    assert isinstance(caught.value, TransientError)
    assert attempts[-1] == pytest.approx(budget)  # one last attempt at the deadline
    assert max(attempts) <= budget + 1e-9  # and none after it: no sleep ran past the deadline
    assert sum(clock.sleeps) == pytest.approx(budget)
    assert len(attempts) >= 2


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_replica_back_just_before_the_deadline_is_reached(monkeypatch, failure):
    """The same class from the caller's side: the service comes back 0.1 s before a 5 s deadline;
    the call succeeds instead of raising."""
    import weightstore.client as client_module

    clock = _VirtualClock()
    monkeypatch.setattr(client_module, "time", clock)
    back_at = clock.now + 4.9

    def handler(request: httpx.Request) -> httpx.Response:
        if clock.now >= back_at:
            return httpx.Response(200, json={"runs": []})
        answer = FAILURES[failure]()
        if isinstance(answer, Exception):
            raise answer
        return answer

    c = Client(["http://one", "http://two"], "tml-x", hash_cache=False, retry_deadline=5.0)
    c.http = httpx.Client(transport=httpx.MockTransport(handler))
    assert c.list_runs() == {"runs": []}
