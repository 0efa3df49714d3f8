"""The streaming engine that writes one blob: bytes in order in, a verified object at its key out.

Rule S1 (docs/design.md): an object appears at ``blobs/sha256/<2>/<64>`` only once the store or
this writer has checked that its bytes hash to that name. ``BlobWriter`` picks one of three
verified paths by size (see its docstring); whatever fails, nothing is left at the blob key.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import queue
from concurrent.futures import Future, ThreadPoolExecutor

from weightstore.blobs.chunks import ChunkDigests, ChunkHasher
from weightstore.errors import IntegrityError, StoreUnavailable
from weightstore.objectstore import ObjectStore, blob_key
from weightstore.settings import Settings

MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
MIN_PART = 5 * 1024 * 1024  # S3's minimum part size (except the last)


def sha256_mismatch(sha256: str) -> IntegrityError:
    """The one answer for received bytes that do not hash to the declared sha256, whichever way they
    were received (hashed here, only hashed because the blob exists, or checked by the store while
    piped): the answer must not say whether someone already stores these bytes (S4)."""
    return IntegrityError(f"sha256 mismatch: the bytes received do not hash to the declared {sha256}")


def part_size_for(size: int, preferred: int) -> int:
    """A part size that keeps every upload within S3's 10,000-part limit."""
    return max(preferred, MIN_PART, math.ceil(size / MAX_PARTS))


def single_put_limit(s: Settings) -> int:
    """Largest file written as one PUT whose SHA-256 the store checks (presigned straight to the blob
    key, or piped by the stream endpoint); -1 when the store does not enforce checksums."""
    return s.single_put_max_bytes if s.s3_verifies_checksums else -1


class _Pipe:
    """A bounded queue that a PUT running on another thread reads as its request body."""

    def __init__(self, depth: int) -> None:
        self.q: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)

    def read(self, n: int = -1) -> bytes:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item or b""

    def fail(self) -> None:
        """Make the reader raise (the PUT is cut off before its Content-Length: nothing is stored)."""
        while True:
            try:
                self.q.put_nowait(InterruptedError("upload aborted"))
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.q.get_nowait()


class BlobWriter:
    """Receives one file's bytes in order and writes them to their blob key.

    The object only becomes visible once size and sha256 match the declaration; otherwise nothing
    is left behind. Three ways, by size:
    - small files: hashed, then one PUT with the SHA-256 checksum;
    - up to ``single_put_max`` (stores that verify checksums): piped as they arrive into one PUT
      carrying the declared SHA-256, which the store checks before the object appears (a short or
      failed body cuts the PUT off) — no hashing here, no parts;
    - otherwise: hashed, sent as multipart parts, completed only if the hash matches.
    When the blob already exists, the bytes are only hashed (the tenant proves it holds them).
    With ``chunk_size``, every path also hashes each ``chunk_size`` slice (``blobs.chunks``):
    ``chunk_digests`` is set once ``finish`` verified the whole file (rule C1; for the piped PUT,
    the store verified exactly the bytes hashed here).
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        sha256: str,
        size: int,
        exists: bool,
        part_size: int,
        threshold: int,
        max_inflight: int = 3,
        single_put_max: int = 0,
        chunk_size: int = 0,
    ) -> None:
        self.store, self.sha256, self.size, self.exists = store, sha256, size, exists
        self.key = blob_key(sha256)
        self.hash = hashlib.sha256()
        self._chunks = ChunkHasher(chunk_size) if chunk_size > 0 else None
        self.chunk_digests: ChunkDigests | None = None
        """Per-chunk sha256s, set by a successful ``finish`` when ``chunk_size`` was given."""
        self.received = 0
        self.part_size = part_size_for(size, part_size)
        self.piped = not exists and threshold <= size <= single_put_max
        self.multipart = not exists and size >= threshold and not self.piped
        self.pending: list[memoryview] = []
        self.pending_len = 0
        self.parts: list[Future[str]] = []
        self.pool: ThreadPoolExecutor | None = None
        self.mpu_id: str | None = None
        self.max_inflight = max_inflight
        self.pipe: _Pipe | None = None
        self.put: Future[None] | None = None
        if self.multipart:
            self.mpu_id = store.create_multipart(self.key)
            self.pool = ThreadPoolExecutor(max_workers=max_inflight)
        elif self.piped:
            self.pipe = _Pipe(depth=max_inflight)
            self.pool = ThreadPoolExecutor(max_workers=1)
            self.put = self.pool.submit(store.put_stream, self.key, self.pipe, size, sha256=sha256)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.received += len(data)
        if self.received > self.size:
            self.abort()
            raise IntegrityError(f"received more than the declared {self.size} bytes")
        if self._chunks is not None:
            self._chunks.update(data)
        if self.piped:
            return self._feed(bytes(data))
        self.hash.update(data)
        if self.exists:
            return
        # Keep references, not copies: a part is joined once, when it is complete.
        self.pending.append(memoryview(data))
        self.pending_len += len(data)
        if self.multipart:
            while self.pending_len >= self.part_size:
                self._send_part(self._take(self.part_size))

    def _take(self, n: int) -> bytes:
        out: list[memoryview] = []
        need = n
        while need and self.pending:
            head = self.pending[0]
            if len(head) <= need:
                out.append(self.pending.pop(0))
                need -= len(head)
            else:
                out.append(head[:need])
                self.pending[0] = head[need:]
                need = 0
        self.pending_len -= n - need
        return b"".join(out)

    def _send_part(self, chunk: bytes) -> None:
        assert self.pool and self.mpu_id
        # Bounded memory: wait for the oldest part when too many are in flight.
        inflight = [p for p in self.parts if not p.done()]
        if len(inflight) >= self.max_inflight:
            inflight[0].result()
        self.parts.append(self.pool.submit(self.store.upload_part, self.key, self.mpu_id, len(self.parts) + 1, chunk))

    def _feed(self, data: bytes | None) -> None:
        assert self.pipe and self.put
        while True:  # bounded memory: wait while the PUT is behind, but notice when it died
            if self.put.done():
                self.put.result()
                raise StoreUnavailable(f"put {self.key}: the object store ended the upload early")
            try:
                self.pipe.q.put(data, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        if self.received != self.size:
            self.abort()
            raise IntegrityError(f"received {self.received} bytes, declared {self.size}")
        if self.piped:
            assert self.pipe and self.put
            try:
                self._feed(None)  # end of body; the store checks the SHA-256 before answering
                self.put.result()
            except IntegrityError as exc:
                raise sha256_mismatch(self.sha256) from exc
            finally:
                self._shutdown()
            self._chunks_verified()
            return
        if self.hash.hexdigest() != self.sha256:
            self.abort()
            raise sha256_mismatch(self.sha256)
        self._chunks_verified()
        if self.exists:
            return
        if not self.multipart:
            self.store.put_bytes(self.key, self._take(self.pending_len), sha256=self.sha256, if_absent=True)
            return
        if self.pending_len or not self.parts:
            self._send_part(self._take(self.pending_len))
        try:
            etags = [p.result() for p in self.parts]
        except BaseException:
            self.abort()
            raise
        parts = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]
        self.store.complete_multipart(self.key, self.mpu_id or "", parts)
        self._shutdown()

    def _chunks_verified(self) -> None:
        """The whole file checked out: its chunk digests may now be recorded (rule C1)."""
        if self._chunks is not None:
            self.chunk_digests = self._chunks.result()

    def abort(self) -> None:
        if self.pipe is not None and self.put is not None and not self.put.done():
            self.pipe.fail()
            with contextlib.suppress(Exception):
                self.put.result(timeout=30)
        if self.mpu_id:
            for p in self.parts:
                p.cancel()
            try:
                self.store.abort_multipart(self.key, self.mpu_id)
            except Exception:  # noqa: BLE001 - leftovers are garbage the collector's orphan phase aborts
                pass
            self.mpu_id = None
        self._shutdown()

    def _shutdown(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


__all__ = ["MAX_PARTS", "MIN_PART", "BlobWriter", "part_size_for", "single_put_limit"]
