"""PyTorch Distributed Checkpoint storage on weightstore (issue 14, part 2): saves on 4 gloo ranks
committed once and atomically, resharded loads on 2, async save, dedup across saves, a rank killed
mid-save, ranged verified partial reads, tenant isolation, and the DCP layout's own validation.
Live server + SeaweedFS (tests/conftest.py); catalog on SQLite, and on PostgreSQL for the
multi-process save/load and the rank killed mid-save (ranks adding files concurrently under the
upload row lock; the PostgreSQL run saves on 2 ranks and loads on 1 to keep it cheap)."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException

from tests.conftest import free_port
from tests.dcp import _ranks
from weightstore import formats
from weightstore.client import Client
from weightstore.errors import IntegrityError, InvalidFormat, InvalidRequest, NotFound, UploadIncomplete
from weightstore.integrations.dcp import WeightstoreStorageReader, WeightstoreStorageWriter

KiB = 1024


SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
"""Most tests: the multi-process saves below also run once on PostgreSQL (issue 14, part 2 item 4)."""


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    return settings.model_copy(update={"chunk_size_bytes": 64 * KiB})


def _cause(exc: CheckpointException) -> BaseException:
    """The first rank's own exception inside DCP's wrapper."""
    return next(iter(exc.failures.values()))[0]


def _spawn(fn, world: int, *args) -> None:  # type: ignore[no-untyped-def]
    """Start ``world`` ranks. Forkserver with torch and the rank module preloaded: each rank is a
    fork of one warm process instead of a fresh interpreter importing torch (seconds on 2 cores)."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(["tests.dcp._ranks"])
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="forkserver")


@pytest.mark.parametrize(("db_url", "save_world", "load_world"), [("sqlite", 4, 2), ("postgresql", 2, 1)], indirect=["db_url"])
def test_save_on_n_ranks_load_on_m_bit_exact_async_and_dedup(server, keys, tmp_path, save_world, load_world):
    """issue 14, part 2: N ranks save (dcp.save, then the same state with dcp.async_save); one
    checkpoint each, DCP's layout; the second save moves 0 data bytes; M ranks load both bit-exact.
    4 → 2 on SQLite, 2 → 1 on PostgreSQL (item 4)."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    _spawn(_ranks.save_ranks, save_world, server.url, keys.trainer, run, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(save_world)]
    assert reports[0]["path1"] == f"tinker://{run}/weights/step1"
    assert all(r["sent1"] > 0 for r in reports)  # every rank sent its own shard the first time
    assert [r["sent2"] for r in reports[1:]] == [0] * (save_world - 1)  # unchanged shards: nothing moved
    ck = c.get_checkpoint(f"tinker://{run}/weights/step1")
    assert ck["layout"] == "dcp"
    names = sorted(f["path"] for f in c.file_urls(f"tinker://{run}/weights/step1")["files"])
    assert names == [".metadata", *(f"__{r}_0.distcp" for r in range(save_world))]
    metadata_size = next(
        f["size_bytes"] for f in c.file_urls(f"tinker://{run}/weights/step2")["files"] if f["path"] == ".metadata"
    )
    assert reports[0]["sent2"] == metadata_size  # the coordinator sent only the new .metadata
    listed = {x["tinker_path"] for x in c.list_checkpoints(run_id=run)["checkpoints"]}
    assert {f"tinker://{run}/weights/step1", f"tinker://{run}/weights/step2"} <= listed
    assert ck["size_bytes"] > 0

    paths = [f"tinker://{run}/weights/step1", f"tinker://{run}/weights/step2"]
    _spawn(_ranks.load_ranks, load_world, server.url, keys.reader, paths, str(tmp_path))
    for r in range(load_world):
        got = json.loads((tmp_path / f"load{r}.json").read_text())
        for path in paths:
            assert got[path]["equal"] == dict.fromkeys(got[path]["equal"], True), (r, path, got[path])
            assert len(got[path]["equal"]) == 7


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_rank_killed_mid_save_commits_nothing_and_next_save_succeeds(server, keys):
    """issue 14, part 2: rank 1 sends its file and dies before DCP gathers the results: no
    checkpoint is visible; a later save under the same name commits (both catalogs, item 4)."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    with pytest.raises(mp.ProcessExitedException):
        _spawn(_ranks.crash_ranks, 2, server.url, keys.trainer, run)
    assert [x["tinker_path"] for x in c.list_checkpoints(run_id=run)["checkpoints"]] == []
    with pytest.raises(NotFound):
        c.get_checkpoint(f"tinker://{run}/weights/crash")
    state = _ranks.full_state()
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="crash")
    dcp.save(state, storage_writer=w)
    assert w.tinker_path == f"tinker://{run}/weights/crash"
    got = _ranks.zeros_like_state(state)
    dcp.load(got, storage_reader=WeightstoreStorageReader(url=server.url, api_key=keys.reader, path=w.tinker_path))
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["optim"]["step"] == 12


@SQLITE_ONLY
def test_partial_load_reads_only_verified_chunks_it_needs(server, keys):
    """issue 14, part 2: loading one tensor of a file reads the chunks covering it (64 KiB chunks,
    each verified against its recorded sha256), not the file; the values are bit-exact."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(256, 256, generator=g), "b": torch.randn(256, 256, generator=g)}  # 256 KiB each
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="big", transfer="stream")
    dcp.save(state, storage_writer=w)
    size = next(f["size_bytes"] for f in c.file_urls(w.tinker_path or "")["files"] if f["path"] == "__0_0.distcp")
    only_b = {"b": torch.zeros(256, 256)}
    reader = WeightstoreStorageReader(url=server.url, api_key=keys.reader, path=w.tinker_path)
    dcp.load(only_b, storage_reader=reader)
    assert torch.equal(only_b["b"], state["b"])
    assert reader.ranged is True
    assert 256 * KiB <= reader.bytes_fetched <= 256 * KiB + 2 * 64 * KiB < size


@SQLITE_ONLY
def test_tampered_chunk_is_refused(server, keys, ctx, monkeypatch):
    """issue 14, part 2: a partial read verifies what it reads: bytes that do not match the chunk
    digest are fetched again and then refused (IntegrityError), never handed to torch.load."""
    from weightstore import loader

    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    state = {"a": torch.ones(128, 256)}
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="t", transfer="stream")
    dcp.save(state, storage_writer=w)
    real = loader.fetch_range

    def flip(raw, url, start, out):  # type: ignore[no-untyped-def]
        real(raw, url, start, out)
        if "distcp" in url and start == 64 * KiB:
            out[10] ^= 0xFF

    monkeypatch.setattr(loader, "fetch_range", flip)
    got = {"a": torch.zeros(128, 256)}
    with pytest.raises(CheckpointException) as failed:
        dcp.load(got, storage_reader=WeightstoreStorageReader(url=server.url, api_key=keys.reader, path=w.tinker_path))
    cause = _cause(failed.value)
    assert isinstance(cause, IntegrityError) and "chunk 1 (bytes 65536-131071)" in str(cause)
    assert torch.equal(got["a"], torch.zeros(128, 256))  # nothing unverified reached the state


@SQLITE_ONLY
def test_other_tenant_cannot_read_a_dcp_checkpoint(server, keys):
    """issue 14, part 2: another tenant's reader gets NotFound, as for any checkpoint."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="s")
    dcp.save({"x": torch.arange(10)}, storage_writer=w)
    with pytest.raises(NotFound):
        WeightstoreStorageReader(url=server.url, api_key=keys.other_trainer, path=w.tinker_path).read_metadata()
    with pytest.raises(CheckpointException) as failed:
        dcp.load(
            {"x": torch.zeros(10, dtype=torch.long)},
            storage_reader=WeightstoreStorageReader(url=server.url, api_key=keys.other_trainer, path=w.tinker_path),
        )
    assert "not found" in str(failed.value)


@SQLITE_ONLY
def test_writer_and_reader_are_picklable_before_and_after_a_save(server, keys):
    """issue 14, part 2 (async_save ships the writer to a thread/process): no live session inside."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="p")
    w2 = pickle.loads(pickle.dumps(w))
    dcp.save({"x": torch.arange(4)}, storage_writer=w2)
    assert pickle.loads(pickle.dumps(w2)).tinker_path == f"tinker://{run}/weights/p"
    r = pickle.loads(pickle.dumps(WeightstoreStorageReader(url=server.url, api_key=keys.reader, path=w2.tinker_path)))
    got = {"x": torch.zeros(4, dtype=torch.long)}
    dcp.load(got, storage_reader=r)
    assert got["x"].tolist() == [0, 1, 2, 3]


def test_dcp_layout_validation():
    """issue 14, part 2: the DCP layout is recognised by its names and validated on its own terms."""
    formats.check_file_set("training", [".metadata", "__0_0.distcp", "__1_0.distcp"])
    formats.check_file_set("training", ["__0_0.distcp"], complete=False)  # ranks still adding
    with pytest.raises(InvalidFormat, match="must contain .metadata"):
        formats.check_file_set("training", ["__0_0.distcp"])
    with pytest.raises(InvalidFormat, match="only .metadata, __RANK_N.distcp files and"):
        formats.check_file_set("training", [".metadata", "__0_0.distcp", "adapter_model.safetensors"])
    with pytest.raises(InvalidFormat, match="full-state"):
        formats.check_file_set("sampler", [".metadata", "__0_0.distcp"])
    assert formats.layout_of(["adapter_model.safetensors", "adapter_config.json"]) == "tinker"
    formats.check_file_set("training", [".metadata", "__0_0.distcp", "adapter_config.json"])  # a LoRA adapter's config
    assert formats.checkpoint_layout("training", [".metadata", "__0_0.distcp"]) == "dcp"
    assert formats.checkpoint_layout("training", ["adapter_model.safetensors", "optimizer.safetensors"]) == "tinker"
    assert formats.checkpoint_layout("files", [".metadata"]) == "files"  # a Hub folder's name means nothing
    assert [formats.checkpoint_layout(k, []) for k in ("external", "merged")] == ["peft", "hf"]
    assert not formats.is_dcp_file("__01_0.distcp") and not formats.is_dcp_file("x/__0_0.distcp")


@SQLITE_ONLY
def test_upload_protocol_refuses_incomplete_or_mixed_dcp_sets(server, keys):
    """issue 14, part 2: a DCP upload commits only a complete DCP file set, exactly the one its
    coordinator expects; only a dcp layout may be declared with no files; a non-pickle .metadata is
    refused at commit."""
    c = Client(server.url, keys.trainer, progress=False, transfer="stream")
    run = c.create_run("tiny-llama")["run_id"]
    with pytest.raises(InvalidRequest, match="at least one file"):
        c.declare_upload(run, "training", "n")
    up = c.declare_upload(run, "training", "d", layout="dcp")["upload_id"]
    data = b"shard bytes"
    other = Client(server.url, keys.other_trainer, progress=False)
    with pytest.raises(NotFound):  # another tenant cannot put files into this upload
        other.add_upload_files(up, {"__9_0.distcp": (len(data), hashlib.sha256(data).hexdigest())})
    ans = c.add_upload_files(up, {"__0_0.distcp": (len(data), hashlib.sha256(data).hexdigest())})
    c.send_upload_files(up, ans, {"__0_0.distcp": data})
    with pytest.raises(InvalidFormat, match="must contain .metadata"):
        c.commit_upload(up)
    with pytest.raises(InvalidFormat, match="only .metadata"):
        c.add_upload_files(up, {"optimizer.safetensors": (2, hashlib.sha256(b"{}").hexdigest())})
    md = b"not a pickle"
    c.send_upload_files(up, c.add_upload_files(up, {".metadata": (len(md), hashlib.sha256(md).hexdigest())}), {".metadata": md})
    with pytest.raises(UploadIncomplete, match="__1_0.distcp"):
        c.commit_upload(up, expect_files=[".metadata", "__0_0.distcp", "__1_0.distcp"])
    with pytest.raises(InvalidFormat, match="not a pickled DCP Metadata"):
        c.commit_upload(up, expect_files=[".metadata", "__0_0.distcp"])
    assert c.list_checkpoints(run_id=run)["checkpoints"] == []


@SQLITE_ONLY
def test_dcp_checkpoint_is_an_ordinary_checkpoint_and_downloads_as_a_dcp_directory(server, keys, tmp_path):
    """issue 14, part 2: a DCP checkpoint is listed, takes a TTL and is deleted like any other;
    downloaded, it is a directory DCP's own FileSystemReader loads bit-exact."""
    from torch.distributed.checkpoint import FileSystemReader

    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    state = _ranks.full_state()
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="o")
    dcp.save(state, storage_writer=w)
    path = w.tinker_path or ""
    assert [x["tinker_path"] for x in c.list_checkpoints(run_id=run)["checkpoints"]] == [path]
    assert c.set_ttl(path, 3600)["expires_at"] is not None
    local = c.download(path, tmp_path / "o")
    got = _ranks.zeros_like_state(state)
    dcp.load(got, storage_reader=FileSystemReader(local))
    assert torch.equal(got["optim"]["exp_avg_sq"], state["optim"]["exp_avg_sq"])
    assert got["optim"]["param_groups"] == state["optim"]["param_groups"]
    c.delete(path)
    with pytest.raises(NotFound):
        WeightstoreStorageReader(url=server.url, api_key=keys.trainer, path=path).read_metadata()


@SQLITE_ONLY
def test_dcp_checkpoint_reports_its_layout_and_is_expired_billed_and_collected(server, keys, ctx, clock):
    """issue 14, part 2 item 1: the native answers (commit, list, get, TTL) name the layout, dcp
    next to a Tinker one; its TTL expires it, the ledger bills it from commit to expires_at, and
    the collector releases and deletes its blobs after the grace, verify() finding nothing."""
    import sqlalchemy as sa

    from tests.collector._util import assert_verified
    from tests.helpers import sampler_files
    from weightstore.db import session_scope
    from weightstore.models import Checkpoint, UsageEvent
    from weightstore.objectstore import blob_key
    from weightstore_gc import run as collect

    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    assert c.upload(run, "sampler", "s", sampler_files(5))["checkpoint"]["layout"] == "tinker"
    w = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="d", ttl_seconds=3600)
    dcp.save({"x": torch.arange(300.0)}, storage_writer=w)
    path = w.tinker_path or ""
    assert {x["name"]: x["layout"] for x in c.list_checkpoints(run_id=run)["checkpoints"]} == {"s": "tinker", "d": "dcp"}
    got = c.get_checkpoint(path)
    assert got["layout"] == "dcp" and c.set_ttl(path, 3600)["layout"] == "dcp"
    shas = {f["sha256"] for f in got["files"]}
    assert len(shas) == 2  # .metadata and __0_0.distcp
    clock.advance(3601)
    assert collect(ctx).stats["expire"]["expired"] == 1
    with session_scope(ctx.engine) as s:
        ck = s.exec(sa.select(Checkpoint).where(Checkpoint.name == "d")).scalar_one()  # type: ignore[call-overload]
        events = s.exec(
            sa.select(UsageEvent.event, UsageEvent.at, UsageEvent.size_bytes)  # type: ignore[call-overload]
            .where(UsageEvent.checkpoint_id == ck.id)
            .order_by(UsageEvent.id)
        ).all()
    assert ck.state == "expired" and ck.size_bytes == got["size_bytes"] > 0
    assert [(e, at) for e, at, _ in events if e != "ttl"] == [("commit", ck.created_at), ("end", ck.expires_at)]
    assert {size for _, _, size in events} == {ck.size_bytes}
    clock.advance(ctx.settings.gc_grace_seconds + 1)
    rep = collect(ctx)
    assert rep.stats["expire"]["released"] == 1 and rep.stats["sweep"]["deleted_objects"] == 2
    assert all(ctx.store.head(blob_key(sha)) is None for sha in shas)
    assert c.get_checkpoint(f"tinker://{run}/sampler_weights/s")["layout"] == "tinker"
    assert_verified(ctx, collected=True)


@SQLITE_ONLY
def test_unchanged_files_of_a_changed_rank_move_nothing(server, keys):
    """issue 14, part 2: a rank's state is split into files of about ``file_bytes``; when only the
    trained part changed, only its file (and the new metadata) is sent."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    state = {"a_frozen": torch.ones(64, 64), "b_trained": torch.zeros(64, 64)}
    w1 = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="1", file_bytes=1)
    dcp.save(state, storage_writer=w1)
    files = {f["path"]: f["size_bytes"] for f in c.file_urls(w1.tinker_path or "")["files"]}
    assert sorted(files) == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    state["b_trained"] += 2
    w2 = WeightstoreStorageWriter(url=server.url, api_key=keys.trainer, run_id=run, name="2", file_bytes=1)
    dcp.save(state, storage_writer=w2)
    new = {f["path"]: f for f in c.file_urls(w2.tinker_path or "")["files"]}
    frozen_file = next(
        p
        for p in new
        if p.endswith(".distcp") and new[p]["sha256"] in {f["sha256"] for f in c.file_urls(w1.tinker_path or "")["files"]}
    )
    changed = next(p for p in new if p.endswith(".distcp") and p != frozen_file)
    assert w2.bytes_sent == new[changed]["size_bytes"] + new[".metadata"]["size_bytes"]
    got = {"a_frozen": torch.zeros(64, 64), "b_trained": torch.zeros(64, 64)}
    dcp.load(got, storage_reader=WeightstoreStorageReader(url=server.url, api_key=keys.reader, path=w2.tinker_path))
    assert torch.equal(got["a_frozen"], torch.ones(64, 64)) and torch.equal(got["b_trained"], torch.full((64, 64), 2.0))


@SQLITE_ONLY
def test_a_failed_save_is_aborted_by_the_next_one(server, keys, ctx):
    """issue 14, part 2: a rank's write error means DCP never calls ``finish``; the coordinator
    stops renewing that upload and aborts it when the writer saves again (or is closed), so its
    blobs are not pinned until the upload's absolute expiry; the retry commits."""
    from weightstore.db import session_scope
    from weightstore.models import Upload

    class Failing(WeightstoreStorageWriter):
        fail = True

        def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
            if self.fail:
                raise OSError("disk full")
            return super().write_data(plan, planner)

    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    w = Failing(url=server.url, api_key=keys.trainer, run_id=run, name="f")
    with pytest.raises(CheckpointException):
        dcp.save({"x": torch.arange(5)}, storage_writer=w)
    first = w.upload_id
    with session_scope(ctx.engine) as s:
        assert s.get(Upload, first).state == "open"
    w.fail = False
    dcp.save({"x": torch.arange(5)}, storage_writer=w)
    with session_scope(ctx.engine) as s:
        assert s.get(Upload, first).state == "aborted"
    assert w.tinker_path == f"tinker://{run}/weights/f" and w.upload_id != first


@pytest.mark.slow
@SQLITE_ONLY
def test_async_save_in_a_checkpoint_process(server, keys, tmp_path):
    """issue 14, part 2 item 5: dcp.async_save(async_checkpointer_type=PROCESS) pickles the writer
    into a spawned checkpoint process (one rank here), which plans, sends and commits there; the
    trainer's own writer object stays untouched (its copy did the work). Slow: a fresh interpreter
    importing torch (the thread variant in the N-rank test covers the writer itself on every run)."""
    c = Client(server.url, keys.trainer, progress=False)
    run = c.create_run("tiny-llama")["run_id"]
    _spawn(_ranks.process_async_ranks, 1, server.url, keys.trainer, run, str(tmp_path))
    assert json.loads((tmp_path / "proc0.json").read_text())["local_writer_path"] is None
    path = f"tinker://{run}/weights/proc"
    assert c.get_checkpoint(path)["layout"] == "dcp"
    state = _ranks.full_state()
    got = _ranks.zeros_like_state(state)
    dcp.load(got, storage_reader=WeightstoreStorageReader(url=server.url, api_key=keys.reader, path=path))
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and torch.equal(got["optim"]["exp_avg"], state["optim"]["exp_avg"])
    assert got["optim"]["step"] == 12
