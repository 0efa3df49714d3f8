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
