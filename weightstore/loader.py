"""Verified parallel reads of checkpoint files from presigned URLs (issue 14, part 1).

One file is fetched as ranged GETs on ``connections`` connections, each range read straight into
its place in one preallocated buffer (an anonymous ``mmap``, or a slice of a pre-sized file's pages)
and hashed on the thread that fetched it: hashlib releases the GIL on large buffers, so the hashing
spreads over every core with no in-order bottleneck. Tensors are then built on that buffer without
another copy (``tensors_from_buffer``: safetensors header parse + ``torch.frombuffer``, which keeps
the buffer alive as long as any tensor uses it).

How every byte is verified:

- **Chunked files** (the files answer carries ``chunk_size`` and ``chunk_sha256``): each range is
  exactly one recorded chunk and must hash to its digest. A range that does not is fetched again,
  alone, up to ``CHUNK_ATTEMPTS`` times; then ``IntegrityError`` names the file and the chunk.
  *Why no whole-file sha256 is needed*: chunk digests are recorded only from bytes whose whole-file
  sha256 was checked against the blob's name in the same pass (rule C1, ``blobs.chunks``). If every
  chunk we hold hashes to the recorded digest and there are as many chunks as recorded, then (by the
  collision resistance of sha256, the same assumption content addressing already rests on) our
  bytes are the recorded bytes, chunk for chunk, which are the bytes whose sha256 names the blob.
  The whole-file identity holds without hashing the file again in order.
- **Files without chunk digests** (blobs from before issue 14, or presigned uploads not backfilled
  yet; the server computes them after the first files request): ranges are fetched in parallel the
  same way and the whole-file sha256 is computed in order on the calling thread as ranges complete.
  A mismatch cannot be pinned to a range: the whole file is fetched once more, then
  ``IntegrityError``.

Test hook: ranges are read through the module function ``fetch_range``, which tests wrap to count
GETs or flip bytes in one answer.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from weightstore.errors import IntegrityError, StoreUnavailable

if TYPE_CHECKING:
    import torch

CONNECTIONS = 8
"""Ranged GETs in flight per file. Measured on the 2-core box: 4-8 saturate SeaweedFS there."""
CHUNK_ATTEMPTS = 3
"""Fetches of one chunk before its mismatch is an ``IntegrityError`` (corruption in transit is rare
and independent per fetch; a chunk that is wrong three times is wrong at the source)."""
LEGACY_PIECE = 16 * 1024 * 1024
"""Range size for files without chunk digests."""


class RangeSource(Protocol):
    """What the loader needs from a transport: ``Client.raw`` (``RawHTTP``) satisfies it."""

    def request(
        self, method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None, stream: bool = False
    ) -> Any: ...


def fetch_range(raw: RangeSource, url: str, start: int, out: memoryview) -> None:
    """Fill ``out`` with bytes ``start .. start+len(out)-1`` of ``url`` (one ranged GET), reading
    straight into it. Raises ``StoreUnavailable`` when the connection ends early."""
    want = len(out)
    r = raw.request("GET", url, headers={"Range": f"bytes={start}-{start + want - 1}"}, stream=True)
    try:
        whole = r.status == 200 and start == 0  # a 200 for a range from 0 the length of the object is the same bytes
        if (r.status != 206 and not whole) or int(r.headers.get("Content-Length", -1)) != want:
            raise IntegrityError(f"the store ignored a Range request ({r.status})")
        got = 0
        fp = r._fp  # http.client.HTTPResponse: readinto fills our buffer with no intermediate copy
        while got < want:
            n = fp.readinto(out[got:])
            if not n:
                raise StoreUnavailable(f"connection closed after {got} of {want} bytes")
            got += n
    except BaseException:
        r.close()  # unread bytes would poison the pooled connection
        raise
    finally:
        r.release_conn()


@dataclass(frozen=True)
class FileSpec:
    """One file of a files answer, as the loader needs it."""

    path: str
    url: str
    size: int
    sha256: str
    chunk_size: int | None
    chunk_sha256: tuple[str, ...] | None

    @classmethod
    def from_answer(cls, f: dict[str, Any]) -> FileSpec:
        chunks = f.get("chunk_sha256")
        size, chunk = int(f["size_bytes"]), int(f.get("chunk_size") or 0)
        usable = chunk > 0 and chunks is not None and len(chunks) == -(-size // chunk)
        if not usable or chunks is None:
            return cls(f["path"], f["url"], size, f["sha256"], None, None)
        return cls(f["path"], f["url"], size, f["sha256"], chunk, tuple(chunks))

    @property
    def chunked(self) -> bool:
        return self.chunk_sha256 is not None


class Stopped(Exception):
    """Another part of the same operation failed: start no further ranges."""


class VerifiedLoader:
    """Fetches files into buffers, verifying every byte (module doc). Thread-safe; one per client."""

    def __init__(
        self,
        raw: RangeSource,
        *,
        connections: int = CONNECTIONS,
        legacy_piece: int = LEGACY_PIECE,
        attempts: int = CHUNK_ATTEMPTS,
    ) -> None:
        self.raw, self.connections, self.legacy_piece, self.attempts = raw, max(1, connections), legacy_piece, attempts

    # --- planning ----------------------------------------------------------------------------
    @staticmethod
    def ranges(spec: FileSpec, piece: int) -> list[tuple[int, int]]:
        """Half-open ranges covering the file: the chunks when recorded, else pieces of ``piece``."""
        step = spec.chunk_size or piece
        return [(o, min(o + step, spec.size)) for o in range(0, spec.size, step)]

    # --- chunked: each range verified on its own -------------------------------------------------
    def _fetch_chunk(self, spec: FileSpec, index: int, start: int, out: memoryview, stop: threading.Event | None) -> None:
        assert spec.chunk_sha256 is not None
        for attempt in range(1, self.attempts + 1):
            if stop is not None and stop.is_set():
                raise Stopped
            fetch_range(self.raw, spec.url, start, out)
            if hashlib.sha256(out).hexdigest() == spec.chunk_sha256[index]:
                return
            if attempt == self.attempts:
                raise IntegrityError(
                    f"{spec.path}: chunk {index} (bytes {start}-{start + len(out) - 1}) does not match its recorded "
                    f"sha256 {spec.chunk_sha256[index]} after {self.attempts} fetches (the stored object or the "
                    "path to it is corrupt)",
                    file=spec.path,
                )

    def fill(
        self,
        spec: FileSpec,
        buf: memoryview,
        *,
        todo: list[tuple[int, int]] | None = None,
        on_range: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Fetch ``spec`` into ``buf`` (``len(buf) == spec.size``), verified. ``todo``: only these
        ranges (a resumed download: chunk-aligned ranges of a chunked file; the rest must already
        be in ``buf`` and verified by the caller). ``on_range(start, end)`` runs on the fetching
        thread once a range is verified (chunked) or written (legacy)."""
        if len(buf) != spec.size:
            raise ValueError("buffer size differs from the file size")
        if spec.chunked:
            self._fill_chunked(spec, buf, todo, on_range, stop)
        else:
            self._fill_whole(spec, buf, on_range, stop)

    def _fill_chunked(
        self,
        spec: FileSpec,
        buf: memoryview,
        todo: list[tuple[int, int]] | None,
        on_range: Callable[[int, int], None] | None,
        stop: threading.Event | None,
    ) -> None:
        assert spec.chunk_size
        plan = todo if todo is not None else self.ranges(spec, spec.chunk_size)

        def one(start: int, end: int) -> None:
            self._fetch_chunk(spec, start // spec.chunk_size, start, buf[start:end], stop)  # type: ignore[operator]  # chunk_size checked above
            if on_range is not None:
                on_range(start, end)

        self._run(plan, one, stop)

    def _fill_whole(
        self, spec: FileSpec, buf: memoryview, on_range: Callable[[int, int], None] | None, stop: threading.Event | None
    ) -> None:
        for attempt in (1, 2):
            if self._whole_once(spec, buf, on_range, stop):
                return
            if attempt == 2:
                raise IntegrityError(
                    f"{spec.path}: the downloaded bytes do not match sha256 {spec.sha256} (twice; the file "
                    "has no chunk digests, so the bad range cannot be named)",
                    file=spec.path,
                )

    def _whole_once(
        self, spec: FileSpec, buf: memoryview, on_range: Callable[[int, int], None] | None, stop: threading.Event | None
    ) -> bool:
        """Parallel ranges into ``buf``; the whole-file sha256 in order on a second thread as they
        land. True when the file matches its sha256."""
        h = hashlib.sha256()
        plan = self.ranges(spec, self.legacy_piece)
        done: set[int] = set()
        hashed = [0]
        cond = threading.Condition()
        failed = threading.Event()

        def one(start: int, end: int) -> None:
            if stop is not None and stop.is_set():
                raise Stopped
            fetch_range(self.raw, spec.url, start, buf[start:end])
            with cond:
                done.add(start)
                cond.notify_all()

        def hash_in_order() -> None:
            for start, end in plan:
                with cond:
                    while start not in done:
                        if not cond.wait(timeout=1.0) and failed.is_set():
                            return
                h.update(buf[start:end])
                hashed[0] = end
                if on_range is not None:
                    on_range(start, end)

        hasher = threading.Thread(target=hash_in_order, name="whole-sha256", daemon=True)
        hasher.start()
        try:
            self._run(plan, one, stop)
        except BaseException:
            failed.set()
            raise
        finally:
            hasher.join()
        return hashed[0] == spec.size and h.hexdigest() == spec.sha256

    def _run(self, plan: list[tuple[int, int]], one: Callable[[int, int], None], stop: threading.Event | None) -> None:
        """Run ``one`` over ``plan`` with ``connections`` in flight; first error stops the rest."""
        if not plan:
            return
        local_stop = threading.Event()
        it: Iterator[tuple[int, int]] = iter(plan)

        def guarded(start: int, end: int) -> None:
            if local_stop.is_set():
                raise Stopped
            one(start, end)

        with ThreadPoolExecutor(max_workers=min(self.connections, len(plan)), thread_name_prefix="range") as pool:
            pending: set[Future[None]] = set()
            for r in it:
                pending.add(pool.submit(guarded, *r))
                if len(pending) >= self.connections:
                    break
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        fut.result()
                    for r in it:
                        if stop is not None and stop.is_set():
                            raise Stopped
                        pending.add(pool.submit(guarded, *r))
                        if len(pending) >= self.connections:
                            break
            except BaseException:
                local_stop.set()
                for fut in pending:
                    fut.cancel()
                raise

    # --- into memory --------------------------------------------------------------------------
    def load_bytes(self, spec: FileSpec, on_range: Callable[[int, int], None] | None = None) -> mmap.mmap:
        """The file's verified bytes in one anonymous mapping (zero pages until filled; no memset);
        ``on_range`` as for ``fill`` (progress)."""
        buf = mmap.mmap(-1, max(1, spec.size))
        view = memoryview(buf)
        try:
            self.fill(spec, view[: spec.size], on_range=on_range)
        finally:
            view.release()
        return buf


# --- safetensors on a buffer, without copies ----------------------------------------------------

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def safetensors_header(buf: mmap.mmap | bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """(header JSON, offset of the data section)."""
    n = int.from_bytes(bytes(buf[:8]), "little")
    if n <= 0 or 8 + n > len(buf):
        raise ValueError("not a safetensors file (bad header length)")
    return json.loads(bytes(buf[8 : 8 + n])), 8 + n


def tensors_from_buffer(buf: mmap.mmap | bytearray, device: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in ``buf``, sharing its memory (``torch.frombuffer``; each
    tensor holds a reference to ``buf``). With ``device``, each is copied there (the one copy a
    device needs) and the host buffer is freed when the last tensor goes."""
    import torch

    header, base = safetensors_header(buf)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        meta = header[name]
        dtype = getattr(torch, _DTYPES[meta["dtype"]])
        begin, end = (int(x) for x in meta["data_offsets"])
        shape = [int(d) for d in meta["shape"]]
        if end == begin:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=base + begin).reshape(shape)
        out[name] = t.to(device) if device is not None else t
    return out


# --- into a pre-sized file (the download command, with its resume journal) ---------------------

GetRange = Callable[[str, int, int], memoryview]
"""``(url, first, last) -> bytes first..last``: ``RawHTTP.get_range``."""


def _pread_sha256(fd: int, start: int, end: int) -> str:
    h = hashlib.sha256()
    pos = start
    while pos < end and (data := os.pread(fd, min(16 * 1024 * 1024, end - pos), pos)):
        h.update(data)
        pos += len(data)
    return h.hexdigest()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def fill_file_chunked(
    loader: VerifiedLoader,
    spec: FileSpec,
    fd: int,
    plan: list[tuple[int, int, bool]],
    get_range: GetRange,
    *,
    piece: int,
    on_written: Callable[[int, int], None],
    stop: threading.Event | None = None,
) -> None:
    """Complete a pre-sized file whose byte ranges ``plan`` lists as ``(start, end, present)`` (the
    download journal's plan), verifying it chunk by chunk. Missing ranges are fetched as pieces of at
    most ``piece`` bytes (cut at chunk boundaries too), in parallel; ``on_written(start, end)`` runs
    once a piece is written (the journal records it). When the last piece of a chunk lands, that
    chunk is read back and hashed on the same thread. A chunk fetched wholly in this run that does
    not match is fetched again alone (``attempts``), then ``IntegrityError`` names it; a chunk that
    held bytes from an earlier run and does not match means the local disk changed them:
    ``IntegrityError`` saying to download again (the caller discards the partial)."""
    cs = spec.chunk_size
    assert cs and spec.chunk_sha256 is not None
    n_chunks = -(-spec.size // cs)
    outstanding = [0] * n_chunks
    had_present = [False] * n_chunks
    pieces: list[tuple[int, int]] = []
    for start, end, present in plan:
        for c in range(start // cs, -(-end // cs)):
            lo, hi = max(start, c * cs), min(end, (c + 1) * cs)
            if present:
                had_present[c] = True
                continue
            for o in range(lo, hi, piece):
                pieces.append((o, min(o + piece, hi)))
                outstanding[c] += 1
    lock = threading.Lock()

    def verify(c: int) -> None:
        lo, hi = c * cs, min((c + 1) * cs, spec.size)
        want = spec.chunk_sha256[c]  # type: ignore[index]  # checked above
        if _pread_sha256(fd, lo, hi) == want:
            return
        if had_present[c]:
            raise IntegrityError(
                f"{spec.path}: chunk {c} (bytes {lo}-{hi - 1}) on the local disk does not match its recorded sha256 "
                f"{want}: the partial file changed since it was written. It was removed: run the download again.",
                file=spec.path,
            )
        for _ in range(loader.attempts - 1):  # the first fetch was one attempt
            data = get_range(spec.url, lo, hi - 1)
            if hashlib.sha256(data).hexdigest() == want:
                _pwrite_all(fd, memoryview(data), lo)
                on_written(lo, hi)
                return
        raise IntegrityError(
            f"{spec.path}: chunk {c} (bytes {lo}-{hi - 1}) does not match its recorded sha256 {want} after "
            f"{loader.attempts} fetches (the stored object or the path to it is corrupt)",
            file=spec.path,
        )

    def one(start: int, end: int) -> None:
        if stop is not None and stop.is_set():
            raise Stopped
        data = get_range(spec.url, start, end - 1)
        _pwrite_all(fd, memoryview(data), start)
        on_written(start, end)
        c = start // cs
        with lock:
            outstanding[c] -= 1
            last = outstanding[c] == 0
        if last:
            verify(c)

    loader._run(pieces, one, stop)
    fetched = {start // cs for start, _ in pieces}
    for c in range(n_chunks):  # chunks that needed no fetch: everything came from an earlier run
        if c not in fetched:
            verify(c)


__all__ = [
    "CHUNK_ATTEMPTS",
    "CONNECTIONS",
    "FileSpec",
    "Stopped",
    "VerifiedLoader",
    "fetch_range",
    "fill_file_chunked",
    "safetensors_header",
    "tensors_from_buffer",
]
