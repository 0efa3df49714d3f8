"""Per-chunk sha256s of blobs (issue 14, part 1): how they are computed, stored and backfilled.

A blob's chunk digests are the sha256 of each ``chunk_size`` slice of its bytes, in order (the last
slice may be shorter), stored as one ``blob_chunks`` row (``digests`` = the raw 32-byte digests
concatenated: 2 KiB per GiB at 16 MiB chunks). A reader that checks every chunk against these has
checked every byte, in parallel, without the in-order whole-file hash (``weightstore.loader``).

Rule C1: chunk digests MUST only be recorded from bytes whose whole-file sha256 was checked against
the blob's name in the same pass (or by the store, for the piped PUT, on exactly the bytes hashed
here). Otherwise a wrong row would make every later load of these bytes fail, for every tenant
that stores them (dedup shares rows), or worse, vouch for bytes that are not the blob.

Where they come from:
- ``ChunkHasher`` inside ``BlobWriter`` (every stream upload and ``store_file``): the bytes are in
  hand there, so the cost is one more sha256 pass on the server;
- the commit of a presigned file that it reads back (multipart, or a store that does not check
  signed checksums: ``uploads._finalize_presigned``): ``hash_key`` computes the whole-file sha256
  and the chunk digests in that one read, and ``mark_live`` records them beside the row;
- ``backfill`` for blobs whose commit read nothing back (a single PUT whose checksum the store
  verified: the server never sees those bytes) and for blobs stored before this existed: it reads
  the object once (``hash_key``) and records the chunks only when the whole file matches. The API
  schedules it when a files request finds some missing; until then readers fall back to the
  whole-file sha256 (still verified, slower).

Catalog functions take ``session`` first and never commit; ``backfill`` is a workflow.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col, select

from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.models import Blob, BlobChunks, BlobState
from weightstore.objectstore import ObjectStore, blob_key

log = logging.getLogger(__name__)
DIGEST_LEN = 32  # raw sha256
BACKFILL_READERS = 4  # parallel ranged reads per blob being backfilled


@dataclass(frozen=True)
class ChunkDigests:
    """The chunk digests of one blob."""

    chunk_size: int
    """Bytes per chunk (the last chunk may be shorter)."""
    digests: tuple[str, ...]
    """sha256 hex of each chunk, in order."""

    def encode(self) -> bytes:
        return b"".join(bytes.fromhex(d) for d in self.digests)

    @classmethod
    def decode(cls, chunk_size: int, raw: bytes) -> ChunkDigests:
        return cls(chunk_size, tuple(raw[i : i + DIGEST_LEN].hex() for i in range(0, len(raw), DIGEST_LEN)))

    def fits(self, size: int) -> bool:
        """Right number of chunks for a blob of ``size`` bytes (an empty blob has none)."""
        return self.chunk_size > 0 and len(self.digests) == -(-size // self.chunk_size)


def chunk_digests_of(data: bytes | bytearray | memoryview, chunk_size: int) -> ChunkDigests:
    """Chunk digests of bytes in memory (tests, small files)."""
    view = memoryview(data)
    return ChunkDigests(
        chunk_size, tuple(hashlib.sha256(view[o : o + chunk_size]).hexdigest() for o in range(0, len(view), chunk_size))
    )


class ChunkHasher:
    """Chunk digests of bytes fed in order, in pieces of any size."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.done: list[str] = []
        self.current = hashlib.sha256()
        self.filled = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.chunk_size - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == self.chunk_size:
                self.done.append(self.current.hexdigest())
                self.current, self.filled = hashlib.sha256(), 0

    def result(self) -> ChunkDigests:
        tail = [self.current.hexdigest()] if self.filled else []
        return ChunkDigests(self.chunk_size, tuple(self.done + tail))


# --- catalog ------------------------------------------------------------------------------------


def record(session: Session, sha256: str, chunks: ChunkDigests) -> None:
    """Store ``chunks`` for blob ``sha256`` (rule C1 is the caller's). The first row wins: rows are
    a pure function of the bytes, so a concurrent writer of the same bytes recorded the same thing
    (or the same bytes at another chunk size, equally right)."""
    if session.get(BlobChunks, sha256) is not None:
        return
    try:
        with session.begin_nested():
            session.add(BlobChunks(sha256=sha256, chunk_size=chunks.chunk_size, digests=chunks.encode()))
    except sa.exc.IntegrityError:
        pass  # recorded concurrently


def get_many(session: Session, shas: Iterable[str]) -> dict[str, ChunkDigests]:
    wanted = sorted(set(shas))
    if not wanted:
        return {}
    rows = session.exec(select(BlobChunks).where(col(BlobChunks.sha256).in_(wanted))).all()
    return {r.sha256: ChunkDigests.decode(r.chunk_size, r.digests) for r in rows}


def missing(session: Session, shas: Iterable[str]) -> list[str]:
    """Which of these blobs have no chunk digests yet."""
    wanted = sorted(set(shas))
    return sorted(set(wanted) - set(get_many(session, wanted)))


def forget(session: Session, shas: Sequence[str]) -> None:
    """Drop the chunk rows of blobs that are gone (the collector's ``blobs.forget``)."""
    if shas:
        session.execute(sa.delete(BlobChunks).where(col(BlobChunks.sha256).in_(list(shas))))


# --- backfill (workflow) -----------------------------------------------------------------------

_inflight: set[str] = set()
_inflight_lock = threading.Lock()


def hash_key(store: ObjectStore, key: str, size: int, chunk_size: int) -> tuple[str, ChunkDigests]:
    """Read object ``key`` (``size`` bytes) once, ``BACKFILL_READERS`` ranged reads in flight, each
    chunk hashed on the thread that fetched it, and return (whole-file sha256, chunk digests). The
    whole-file hash runs in order on the calling thread; at most ``2 * BACKFILL_READERS`` chunks are
    held at once, however far the readers get ahead of it. The caller compares the whole-file sha256
    with the blob's name before recording the chunks (rule C1). Workflow (object-store I/O only)."""
    whole = hashlib.sha256()
    offsets = iter(range(0, size, chunk_size))

    def fetch(offset: int) -> tuple[bytes, str]:
        data = store.read_range(key, offset, min(chunk_size, size - offset))
        return data, hashlib.sha256(data).hexdigest()

    digests: list[str] = []
    with ThreadPoolExecutor(max_workers=BACKFILL_READERS) as pool:
        window: deque[Future[tuple[bytes, str]]] = deque(
            pool.submit(fetch, o) for o in itertools.islice(offsets, 2 * BACKFILL_READERS)
        )
        while window:
            data, digest = window.popleft().result()
            if (nxt := next(offsets, None)) is not None:
                window.append(pool.submit(fetch, nxt))
            whole.update(data)  # in order
            digests.append(digest)
    return whole.hexdigest(), ChunkDigests(chunk_size, tuple(digests))


def hash_stored(ctx: Context, sha256: str, size: int, chunk_size: int) -> tuple[str, ChunkDigests]:
    """``hash_key`` on blob ``sha256``'s own key. Workflow (object-store I/O only)."""
    return hash_key(ctx.store, blob_key(sha256), size, chunk_size)


def backfill(ctx: Context, shas: Iterable[str]) -> int:
    """Compute and record chunk digests for those of ``shas`` that are live and lack them (rule C1:
    only when the bytes read hash to the blob's name; a mismatch is logged as data loss and nothing
    is recorded). Returns how many were recorded. Several callers may run at once: a blob being
    backfilled by this process is skipped. Workflow: one short transaction before and one per blob."""
    with session_scope(ctx.engine) as session:
        todo = missing(session, shas)
        sizes = {
            b.sha256: b.size_bytes
            for b in session.exec(select(Blob).where(col(Blob.sha256).in_(todo), col(Blob.state) == BlobState.live)).all()
        }
    recorded = 0
    for sha, size in sizes.items():
        with _inflight_lock:
            if sha in _inflight:
                continue
            _inflight.add(sha)
        try:
            whole, chunks = hash_stored(ctx, sha, size, ctx.settings.chunk_size_bytes)
            if whole != sha:
                log.error("blob %s: the stored bytes hash to %s: not recording chunk digests (data loss?)", sha, whole)
                continue
            with session_scope(ctx.engine) as session:
                record(session, sha, chunks)
            recorded += 1
        except Exception:  # noqa: BLE001 - best effort: readers fall back to the whole-file sha256
            log.warning("chunk digests for blob %s: backfill failed; will retry on a later request", sha, exc_info=True)
        finally:
            with _inflight_lock:
                _inflight.discard(sha)
    return recorded


__all__ = [
    "ChunkDigests",
    "ChunkHasher",
    "backfill",
    "chunk_digests_of",
    "forget",
    "get_many",
    "hash_key",
    "hash_stored",
    "missing",
    "record",
]
