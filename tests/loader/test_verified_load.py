"""Verified parallel loads (issue 14, part 1): per-chunk sha256s recorded at commit, a reader that
checks each chunk as it lands and re-fetches a bad one alone, loads straight into memory, and the
``download`` command on the same reader. Live server + SeaweedFS (tests/conftest.py), 1 MiB chunks."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from weightstore import loader, tensorio
from weightstore.blobs import chunks
from weightstore.blobs.chunks import ChunkHasher, chunk_digests_of
from weightstore.client import Client, RawHTTP
from weightstore.errors import IntegrityError, NotFound
from weightstore.formats import ADAPTER_WEIGHTS, OPTIMIZER_STATE
from weightstore.loader import RangeSource

MiB = 1024 * 1024
WEIGHTS = {
    "a": torch.randn(1000, 1100, generator=torch.Generator().manual_seed(1)),  # ~4.2 MiB of f32
    "b": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
    "c": torch.tensor([True, False]),
}
DATA = tensorio.weights_bytes(WEIGHTS)
SHA = hashlib.sha256(DATA).hexdigest()
N_CHUNKS = -(-len(DATA) // MiB)
CONFIG = b'{"r": 4, "lora_alpha": 8}'


def _save(c: Client, name: str = "w", transfer: str | None = None) -> str:
    if transfer:
        c.transfer = transfer
    run = c.create_run("tiny-llama")["run_id"]
    return str(c.upload(run, "sampler", name, {ADAPTER_WEIGHTS: DATA, "adapter_config.json": CONFIG})["tinker_path"])


def _weights_answer(c: Client, path: str) -> dict:  # type: ignore[type-arg]
    return next(f for f in c.file_urls(path)["files"] if f["path"] == ADAPTER_WEIGHTS)


def _hook(monkeypatch: pytest.MonkeyPatch, corrupt: dict[int, int] | None = None) -> list[int]:
    """Wrap ``loader.fetch_range``: record the start offset of each GET of the weights file and flip
    one byte in the answer for chunk ``k`` the first ``corrupt[k]`` times it is fetched."""
    starts: list[int] = []
    real = loader.fetch_range
    left = dict(corrupt or {})

    def fetch(raw: RangeSource, url: str, start: int, out: memoryview) -> None:
        real(raw, url, start, out)
        if SHA in url:
            starts.append(start)
            k = start // MiB
            if left.get(k, 0) > 0:
                left[k] -= 1
                out[7] ^= 0xFF

    monkeypatch.setattr(loader, "fetch_range", fetch)
    return starts


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k], want[k]), k


def test_chunk_hasher_matches_in_memory_digests():
    """issue 14, part 1: chunk digests do not depend on how the bytes were cut on the way in."""
    want = chunk_digests_of(DATA, MiB)
    assert len(want.digests) == N_CHUNKS and want.fits(len(DATA))
    for piece in (1, 4095, MiB, 3 * MiB + 5):
        h = ChunkHasher(MiB)
        for o in range(0, len(DATA), piece if piece > 1 else len(DATA)):
            h.update(DATA[o : o + (piece if piece > 1 else len(DATA))])
        assert h.result() == want
    assert chunks.ChunkDigests.decode(MiB, want.encode()) == want


def test_stream_upload_records_chunks_and_load_is_bit_exact(server, keys, monkeypatch):
    """issue 14, part 1: a streamed save records per-chunk sha256s at commit; the files answer
    carries them; ``load_weights`` fetches each chunk once and rebuilds the tensors bit-exactly,
    sharing the downloaded buffer (no copy)."""
    c = Client(server.url, keys.trainer, hash_cache=False)
    path = _save(c, transfer="stream")
    ans = _weights_answer(c, path)
    assert ans["chunk_size"] == MiB and ans["chunk_sha256"] == list(chunk_digests_of(DATA, MiB).digests)
    starts = _hook(monkeypatch)
    got = c.load_weights(path)
    _equal(got, WEIGHTS)
    assert sorted(starts) == [k * MiB for k in range(N_CHUNKS)]
    # Both tensors are views of the one downloaded buffer: the same storage address range.
    a, b = got["a"], got["b"]
    lo = a.untyped_storage().data_ptr()
    assert lo <= b.untyped_storage().data_ptr() < lo + len(DATA)


def test_corrupt_chunk_is_fetched_again_alone(server, keys, monkeypatch):
    """issue 14, part 1: a byte flipped in one range answer: only that chunk is fetched again and
    the load succeeds bit-exactly."""
    c = Client(server.url, keys.trainer, hash_cache=False)
    path = _save(c, transfer="stream")
    starts = _hook(monkeypatch, corrupt={2: 1})
    _equal(c.load_weights(path), WEIGHTS)
    assert sorted(starts) == sorted([k * MiB for k in range(N_CHUNKS)] + [2 * MiB])


def test_persistent_corruption_names_file_and_chunk(server, keys, monkeypatch):
    """issue 14, part 1: a chunk wrong on every fetch: bounded retries, then ``IntegrityError``
    naming the file and the chunk."""
    c = Client(server.url, keys.trainer, hash_cache=False)
    path = _save(c, transfer="stream")
    starts = _hook(monkeypatch, corrupt={3: 99})
    with pytest.raises(IntegrityError, match=rf"{ADAPTER_WEIGHTS}: chunk 3 \(bytes {3 * MiB}-"):
        c.load_weights(path)
    assert starts.count(3 * MiB) == loader.CHUNK_ATTEMPTS


def test_legacy_blob_without_chunks_loads_verified_then_gets_them(server, keys, ctx, monkeypatch):
    """issue 14, part 1: a presigned save (the server never sees the bytes) has no chunk digests:
    the load verifies the whole-file sha256 and a corrupted answer is caught; the files request
    has the server backfill the digests, so the next answer carries them."""
    c = Client(server.url, keys.trainer, hash_cache=False, range_part=MiB)
    path = _save(c, transfer="presigned")
    ans = _weights_answer(c, path)
    assert ans["chunk_sha256"] is None or ans["chunk_size"] == MiB  # backfill may already have run
    # Whatever the race with the backfill, a spec without digests takes the whole-file path:
    spec = loader.FileSpec.from_answer({**ans, "chunk_size": None, "chunk_sha256": None})
    starts = _hook(monkeypatch, corrupt={1: 1})
    buf = c.loader.load_bytes(spec)
    assert bytes(buf[: len(DATA)]) == DATA
    assert len(starts) == 2 * N_CHUNKS  # the mismatch cannot be pinned: the whole file once more
    _hook(monkeypatch, corrupt={1: 2})
    with pytest.raises(IntegrityError, match="no chunk digests"):
        c.loader.load_bytes(spec)
    deadline = time.monotonic() + 20
    while _weights_answer(c, path)["chunk_sha256"] is None:
        assert time.monotonic() < deadline, "the server never backfilled the chunk digests"
        time.sleep(0.1)
    assert _weights_answer(c, path)["chunk_sha256"] == list(chunk_digests_of(DATA, MiB).digests)
    _equal(c.load_weights(path), WEIGHTS)


def test_backfill_refuses_bytes_that_do_not_match_their_name(server, keys, ctx):
    """issue 14, rule C1: the backfill records nothing when the stored bytes are not the blob."""
    c = Client(server.url, keys.trainer, hash_cache=False)
    _save(c, transfer="presigned")
    from weightstore.objectstore import blob_key

    ctx.store.put_bytes(blob_key(SHA), DATA[:-1] + bytes([DATA[-1] ^ 0xFF]))  # bit rot in the store
    assert hashlib.sha256(ctx.store.read_bytes(blob_key(SHA))).hexdigest() != SHA
    from weightstore.db import session_scope

    with session_scope(ctx.engine) as s:
        chunks.forget(s, [SHA])
    assert chunks.backfill(ctx, [SHA]) == 0
    with session_scope(ctx.engine) as s:
        assert chunks.get_many(s, [SHA]) == {}


def test_load_state_with_optimizer_is_bit_exact(server, keys):
    """issue 14, part 1: ``load_state`` builds weights and optimizer tensors on their buffers."""
    from tests.helpers import state_files

    files = state_files(3)
    c = Client(server.url, keys.trainer, hash_cache=False, transfer="stream")
    run = c.create_run("tiny-llama")["run_id"]
    path = c.upload(run, "training", "s", files)["tinker_path"]
    weights, opt = c.load_state(path)
    _equal(weights, tensorio.load_weights(files[ADAPTER_WEIGHTS]))
    want = tensorio.load_optimizer(files[OPTIMIZER_STATE])
    assert opt is not None and opt["param_groups"] == want["param_groups"]
    for idx, st in want["state"].items():
        for k, v in st.items():
            got = opt["state"][idx][k]
            assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v


def test_foreign_tenant_cannot_load(server, keys):
    """issue 14, part 1: another tenant's checkpoint is missing, as for every other read."""
    path = _save(Client(server.url, keys.trainer, hash_cache=False), transfer="stream")
    with pytest.raises(NotFound):
        Client(server.url, keys.other_trainer, hash_cache=False).load_weights(path)


def test_download_command_uses_the_chunk_verified_reader(server, keys, tmp_path, monkeypatch):
    """issue 14, part 1: ``weightstore download`` fetches a chunked file one GET per chunk, and a
    chunk corrupted in transit is fetched again alone (the old whole-file path would have failed
    the whole file); the file lands byte-identical, with no partial or journal left."""
    from weightstore_cli import app as cli_app

    path = _save(Client(server.url, keys.trainer, hash_cache=False), transfer="stream")
    starts: list[int] = []
    real = RawHTTP.get_range
    flipped = [False]

    def get_range(self: RawHTTP, url: str, first: int, last: int) -> memoryview:
        data = real(self, url, first, last)
        if SHA in url:
            starts.append(first)
            if first == MiB and not flipped[0]:
                flipped[0] = True
                data[0] ^= 0xFF
        return data

    monkeypatch.setattr(RawHTTP, "get_range", get_range)
    dest = tmp_path / "dl"
    res = CliRunner().invoke(
        cli_app, ["download", path, str(dest)], env={"WEIGHTSTORE_URL": server.url, "WEIGHTSTORE_API_KEY": keys.trainer}
    )
    assert res.exit_code == 0, res.output
    assert (dest / ADAPTER_WEIGHTS).read_bytes() == DATA
    assert sorted(starts) == sorted([k * MiB for k in range(N_CHUNKS)] + [MiB])
    assert sorted(p.name for p in Path(dest).iterdir()) == ["adapter_config.json", ADAPTER_WEIGHTS]


def test_presigned_put_body_is_not_sent_under_the_connect_timeout(monkeypatch):
    """issue 14 (H4, found while benchmarking): urllib3 sends a request body under the *connect*
    timeout. With 10 s, a 1 GiB presigned PUT that SeaweedFS paused reading for 10 s (a loaded
    machine) was aborted mid-body as "object store unreachable": ``Client.upload`` fell back to
    the service and a DCP rank's save failed. A body is sent with 60 s (botocore's default)."""
    import urllib3

    seen: list[tuple[str, object]] = []

    def urlopen(self, method, url, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append((method, kw.get("timeout")))
        raise urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]

    monkeypatch.setattr(urllib3.PoolManager, "urlopen", urlopen)
    raw = RawHTTP(300)
    for method, body in [("PUT", b"x" * 10), ("GET", None)]:
        with pytest.raises(Exception, match="cannot reach"):
            raw.request(method, "http://127.0.0.1:9/k", body=body)
    put, get = (t if t is not None else raw.pool.connection_pool_kw["timeout"] for _, t in seen)
    assert put.connect_timeout == 60 and put.read_timeout == 300
    assert get.connect_timeout == 10  # an unreachable store is still noticed quickly
