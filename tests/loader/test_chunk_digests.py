"""Chunk digests recorded where a blob's bytes are written (issue 14, part 1, rule C1): each of the
``BlobWriter``'s paths yields the same digests as hashing the bytes in memory, only once the whole
file was verified; ``mark_live`` records them and the collector's ``forget`` drops them."""

from __future__ import annotations

import hashlib
import os

import pytest

from weightstore import blobs
from weightstore.blobs import chunks
from weightstore.blobs.writer import BlobWriter
from weightstore.db import session_scope
from weightstore.errors import IntegrityError
from weightstore.models import Blob, BlobState

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("path", "size", "single_put_max"),
    [("small", 3 * MiB + 17, 0), ("piped", 7 * MiB + 3, 64 * MiB), ("multipart", 11 * MiB + 1, 0)],
)
def test_every_writer_path_records_the_chunks_of_the_bytes(ctx, path, size, single_put_max):
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    w = BlobWriter(
        ctx.store, sha256=sha, size=size, exists=False, part_size=5 * MiB, threshold=5 * MiB,
        single_put_max=single_put_max, chunk_size=MiB,
    )  # fmt: skip
    assert (w.piped, w.multipart) == (path == "piped", path == "multipart")
    for o in range(0, size, 999_999):
        w.write(data[o : o + 999_999])
    assert w.chunk_digests is None  # nothing is vouched for before the whole file checked out
    w.finish()
    assert w.chunk_digests == chunks.chunk_digests_of(data, MiB)
    now = ctx.clock.now()
    with session_scope(ctx.engine) as s:
        blobs.mark_live(s, sha, size, now, chunk_digests=w.chunk_digests)
    with session_scope(ctx.engine) as s:
        assert chunks.get_many(s, [sha]) == {sha: chunks.chunk_digests_of(data, MiB)}
        row = s.get(Blob, sha)
        assert row is not None
        row.state = BlobState.deleting
        s.add(row)
    with session_scope(ctx.engine) as s:
        assert blobs.forget(s, [sha]) == 1
        assert chunks.get_many(s, [sha]) == {}


def test_a_mismatching_file_yields_no_chunk_digests(ctx):
    data = os.urandom(2 * MiB)
    w = BlobWriter(ctx.store, sha256="0" * 64, size=len(data), exists=True, part_size=5 * MiB, threshold=5 * MiB, chunk_size=MiB)
    w.write(data)
    with pytest.raises(IntegrityError):
        w.finish()
    assert w.chunk_digests is None


# --- presigned commits: chunk digests hashed in the commit's one read-back ---------------------

STAGED = {  # the two ways a presigned file is read back at commit
    "staged single PUT": {"s3_verifies_checksums": False},
    "multipart": {"single_put_max_bytes": 0, "multipart_threshold_bytes": 5 * MiB, "part_size_bytes": 5 * MiB},
}


def _presigned_files() -> dict[str, bytes]:
    import torch

    from weightstore import tensorio

    w = {"a": torch.randn(23 * MiB // 8, generator=torch.Generator().manual_seed(3))}  # 11.5 MiB: 12 chunks, 3 parts
    return {"adapter_model.safetensors": tensorio.weights_bytes(w), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'}


def _count_reads(ctx, monkeypatch, tamper: bool = False) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    """Record every object-store read as (method, start, length); ``tamper`` flips a byte in every
    ranged read of a staging object (the stored bytes are not the declared ones)."""
    reads: list[tuple[str, int, int]] = []
    store = ctx.store
    real_range = store.read_range

    def read_range(key: str, start: int, length: int) -> bytes:
        data = real_range(key, start, length)
        reads.append(("read_range", start, len(data)))
        if tamper and "staging/" in key and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data

    monkeypatch.setattr(store, "read_range", read_range)
    for name in ["iter_chunks", "read_bytes", "hash_object", "download_file"]:

        def other(*a, _real=getattr(store, name), _name=name, **kw):  # type: ignore[no-untyped-def]
            reads.append((_name, 0, -1))
            return _real(*a, **kw)

        monkeypatch.setattr(store, name, other)
    return reads


@pytest.mark.parametrize("how", sorted(STAGED))
def test_presigned_commit_records_chunks_from_its_one_read(server, keys, ctx, monkeypatch, how):
    """issue 14, part 1 (H4): a presigned file that the commit reads back (staging key: multipart, or
    a store that does not check signed checksums) gets its chunk digests from that same read, so
    they are there right after the commit and no backfill reads the bytes a second time. Before,
    the commit hashed the whole object and a later files request had ``backfill`` read it again."""
    from weightstore.client import Client

    ctx.settings = ctx.settings.model_copy(update=STAGED[how])
    files = _presigned_files()
    data = files["adapter_model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    reads = _count_reads(ctx, monkeypatch)
    with Client(server.url, keys.trainer, transfer="presigned", hash_cache=False) as c:
        run = c.create_run("tiny-llama")["run_id"]
        path = str(c.upload(run, "sampler", "w", files)["tinker_path"])
        with session_scope(ctx.engine) as s:  # recorded by the commit itself
            assert chunks.get_many(s, [sha]) == {sha: chunks.chunk_digests_of(data, MiB)}
        ans = next(f for f in c.file_urls(path)["files"] if f["path"] == "adapter_model.safetensors")
        assert ans["chunk_sha256"] == list(chunks.chunk_digests_of(data, MiB).digests)
        assert c.load_weights(path).keys() == {"a"}
    # Every byte of the weights file read by the server exactly once: one ranged read per chunk,
    # plus the format check's header reads (small, from offset 0), nothing whole-object.
    big = [(s0, n) for m, s0, n in reads if m == "read_range" and n >= 64 * 1024]
    assert sorted(big) == [(o, min(MiB, len(data) - o)) for o in range(0, len(data), MiB)]
    assert all(m == "read_range" for m, _, _ in reads), reads
    assert sum(n for _, _, n in reads) - len(data) < 64 * 1024 + 2 * len(files["adapter_config.json"])


def test_tampered_presigned_object_fails_the_commit_and_records_nothing(server, keys, ctx, monkeypatch):
    """issue 14, rule C1 (H4): when the bytes read back at commit are not the declared ones, the
    commit fails and neither the blob row nor any chunk digest is recorded (multipart; the staged
    single PUT takes the same ``_hash_back``)."""
    from weightstore.client import Client
    from weightstore.errors import WeightstoreError

    ctx.settings = ctx.settings.model_copy(update=STAGED["multipart"])
    files = _presigned_files()
    sha = hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
    _count_reads(ctx, monkeypatch, tamper=True)
    with Client(server.url, keys.trainer, transfer="presigned", hash_cache=False) as c:
        run = c.create_run("tiny-llama")["run_id"]
        with pytest.raises(WeightstoreError, match="sha256"):
            c.upload(run, "sampler", "w", files)
        assert c.list_checkpoints(run_id=run)["checkpoints"] == []
    with session_scope(ctx.engine) as s:
        assert s.get(Blob, sha) is None
        assert chunks.get_many(s, [sha]) == {}


def test_base_model_blob_keeps_the_chunk_digests_its_writer_hashed(ctx):
    """issue 14, part 1 (H4, found 2): ``basemodels.finish_blob`` marked the blob live without the
    chunk digests its ``BlobWriter`` had just computed, so they were thrown away and a later
    backfill read the whole object again."""
    from weightstore import basemodels

    data = os.urandom(3 * MiB + 5)
    sha = hashlib.sha256(data).hexdigest()
    w = blobs.open_writer(ctx, sha, len(data))
    w.write(data)
    basemodels.finish_blob(ctx, w)
    with session_scope(ctx.engine) as s:
        assert chunks.get_many(s, [sha]) == {sha: chunks.chunk_digests_of(data, MiB)}
