"""Python client for the native API: save, load, download, list, delete, TTL.

```python
from weightstore.client import Client
c = Client("http://127.0.0.1:8000", api_key="tml-...")
run = c.create_run(base_model="Qwen/Qwen3-8B", lora_rank=32)
path = c.save_state(run["run_id"], "step-100", weights, optimizer, adapter_config={"r": 32, "lora_alpha": 32})
weights, opt_state = c.load_state(path)
optimizer.load_state_dict(opt_state)
```

Errors come back as the core exception classes (``error_for_code``), so ``except NotFound`` works
across the wire.

Several replicas, retries and failover (issue 13, found 8). ``base_url`` (or ``WEIGHTSTORE_URL``) may
name several API replicas, as a list or comma-separated. The client talks to one and moves to the next
when a connection fails or the answer is 502/503/504, and keeps using the one that answered. Between
rounds over every replica it backs off exponentially with jitter (and at least ``Retry-After``), until
``retry_deadline`` seconds (``WEIGHTSTORE_RETRY_DEADLINE_SECONDS``, default 60) have passed since the
call began (a back-off that would end past the deadline is cut short, so the last attempt is made at
the deadline and the whole budget is used); then it raises a typed ``TransientError``: the service's own (``CatalogBusy``, ...) or
``ServiceUnavailable`` when no replica answered. Never a raw ``httpx`` exception.

Which calls are repeated (the rule):
1. A request whose connection could not even be opened never reached a server: any call is sent
   again, to the next replica.
2. A request that may have reached a server (the connection broke after sending, a read timed out, a
   502/503/504 answer) is sent again only when repeating it is safe:
   - by HTTP semantics: GET, HEAD, PUT, DELETE, OPTIONS (a streamed file PUT sends the same declared
     bytes to the same content-addressed name);
   - by the upload protocol: ``commit`` of an upload id (a commit of an upload already committed
     answers the checkpoint it made), ``renew`` (extends a lease), ``declare`` (a duplicate declare
     is an upload nobody renews: the collector closes it one lease later, so the cost is one lease
     of pinned blobs and quota, never a second checkpoint).
3. Any other call (``POST /v1/runs``, pins, keys, ...) is not repeated once it may have been sent:
   the client raises ``ServiceUnavailable`` saying it may or may not have been applied.
A repeated ``DELETE`` whose first attempt may have been applied treats ``not_found`` as done.

Uploads hold a lease (``uploads`` module doc): while one is open the client renews it from a
background thread every third of ``lease_seconds``, through whichever replica answers, so a replica
that dies mid-upload costs nothing, and a client that dies releases its blobs one lease later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from tqdm import tqdm

from weightstore.errors import (
    Forbidden,
    IntegrityError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    StoreUnavailable,
    UploadExpired,
    UploadIncomplete,
    WeightstoreError,
    error_for_code,
)
from weightstore.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DCP_METADATA, OPTIMIZER_STATE
from weightstore.hashing import sha256_file
from weightstore.loader import FileSpec, Stopped, VerifiedLoader, fill_file_chunked, tensors_from_buffer
from weightstore.names import TinkerPath, check_file_path

if TYPE_CHECKING:  # torch is imported only by the calls that need it: the CLI starts fast without it
    import torch

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
RETRIES = 4
COMMIT_ATTEMPTS = 5  # a commit that finds files unproven re-sends just those (to the upload's own keys)
DECLARE_ATTEMPTS = 3  # a fresh upload after the first one gave out (expired, or files kept failing)
BACKOFF_S = 0.25  # first pause between attempts; doubles, capped at 4 s
RANGE_PART = 32 * 1024 * 1024  # large downloads: parallel ranged GETs of this size
FileSource = bytes | Path
TRANSFERS = ("auto", "presigned", "stream")
"""``presigned``: bytes go straight to the object store (fastest, keeps bulk bytes off the API tier);
``stream``: through the service (trainers that cannot reach the store); ``auto`` (default): presigned,
falling back to stream for this client once the store turns out to be unreachable from here."""


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})  # RFC 9110 §9.2.2
RETRY_DEADLINE_S = 60.0
"""Default of ``retry_deadline``: longer than a PostgreSQL restart (~20 s) or a replica's restart."""
FAILOVER_STATUSES = frozenset({502, 503, 504})
RETRY_BACKOFF_CAP_S = 8.0
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport errors raised before a single byte of the request left: always safe to send again."""


def parse_base_urls(base_url: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The API replicas named by ``base_url`` (a list, or a comma-separated string), else by
    ``WEIGHTSTORE_URL`` (comma-separated), else the local default; trailing slashes dropped."""
    raw: list[str]
    if isinstance(base_url, list | tuple):
        raw = [str(u) for u in base_url]
    else:
        raw = (base_url or os.environ.get("WEIGHTSTORE_URL") or "http://127.0.0.1:8000").split(",")
    urls = [u.strip().rstrip("/") for u in raw if u.strip()]
    if not urls:
        raise ValueError("base_url names no URL")
    return urls


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:  # an HTTP date: not sent by weightstore; treat as "no hint"
        return 0.0


def _jittered(round_: int) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so clients that failed
    together do not come back together."""
    step: float = min(BACKOFF_S * 2**round_, RETRY_BACKOFF_CAP_S)
    return step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not cryptography


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    code = body.get("code") if isinstance(body, dict) else None
    message = (body.get("message") if isinstance(body, dict) else None) or response.text or response.reason_phrase
    cls = error_for_code(code) if code else WeightstoreError
    if not code and response.status_code in FAILOVER_STATUSES:
        cls = ServiceUnavailable  # a proxy or load balancer in front found no replica to answer
    err = cls(f"{message} (HTTP {response.status_code})", **(body.get("details") or {}) if isinstance(body, dict) else {})
    # The HTTP status rides along for callers that log it; the core error classes know nothing of HTTP.
    err.status_code = response.status_code
    raise err


class RawHTTP:
    """Traffic to presigned URLs (straight to the object store). urllib3 rather than httpx: its
    C-backed body reads are several times faster on GiB-sized transfers than httpx's pure-Python
    HTTP/1.1 parser, which made downloads CPU-bound. No API key is ever sent here."""

    def __init__(self, timeout: float, maxsize: int = 16) -> None:
        import urllib3

        self.pool = urllib3.PoolManager(maxsize=maxsize, retries=False, timeout=urllib3.Timeout(connect=10, read=timeout))
        # urllib3 sends a request body under the *connect* timeout: a store that pauses reading a
        # GiB-sized PUT body for more than 10 s (SeaweedFS under load does) aborted a healthy upload
        # as "unreachable". Bodies get botocore's 60 s connect timeout (capped by the read timeout).
        self.body_timeout = urllib3.Timeout(connect=min(60.0, timeout), read=timeout)

    def request(
        self, method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None, stream: bool = False
    ) -> Any:
        import urllib3

        try:
            kw: dict[str, Any] = {"timeout": self.body_timeout} if body is not None else {}
            r = self.pool.request(method, url, body=body, headers=headers or {}, preload_content=not stream, **kw)
        except urllib3.exceptions.HTTPError as exc:
            err = StoreUnavailable(f"cannot reach the object store behind a presigned URL: {exc}")
            # Read back (getattr) by the presigned upload path to fall back to streaming; client-side only.
            err.unreachable = True
            raise err from exc
        if r.status >= 400:
            detail = r.data[:300].decode("utf-8", "replace") if not stream else ""
            r.release_conn()
            if r.status == 403:
                raise Forbidden(f"the object store refused the presigned URL (expired or tampered): {detail}")
            if r.status == 404:
                raise NotFound("object not found behind the presigned URL")
            if r.status >= 500:
                raise StoreUnavailable(f"object store error {r.status}")
            raise IntegrityError(f"object store refused the transfer ({r.status}): {detail}")
        return r

    def get_range(self, url: str, first: int, last: int) -> memoryview:
        """Bytes ``first..last`` (inclusive) read straight into one buffer: no intermediate copies,
        which matter when GiBs go through a 2-core machine that also hashes them."""
        r = self.request("GET", url, headers={"Range": f"bytes={first}-{last}"}, stream=True)
        try:
            want = last - first + 1
            # 200 is the same bytes when the range starts at 0 and the whole object is that long.
            whole = r.status == 200 and first == 0
            if (r.status != 206 and not whole) or int(r.headers.get("Content-Length", -1)) != want:
                raise IntegrityError(f"the store ignored a Range request ({r.status})")
            buf = memoryview(bytearray(want))
            got = 0
            raw = r._fp  # http.client.HTTPResponse: readinto fills our buffer directly
            while got < want:
                n = raw.readinto(buf[got:])
                if not n:
                    raise StoreUnavailable(f"connection closed after {got} of {want} bytes")
                got += n
            return buf
        except BaseException:
            r.close()  # unread bytes would poison the pooled connection: drop it, do not drain it
            raise
        finally:
            r.release_conn()

    def close(self) -> None:
        self.pool.clear()


JOURNAL_VERSION = 1


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping half-open ranges; touching ranges become one."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class _RangeJournal:
    """Which byte ranges of a ``.partial`` download are on disk: the sidecar ``<file>.partial.json``.

    A ``.partial`` is pre-sized to its full length (parallel ranged GETs land anywhere in it), so
    neither its size nor its contents say what was written; only this journal does. A range is
    recorded only after its bytes were written *and* flushed (fdatasync), and the journal is replaced
    atomically and fsync'd, so after Ctrl-C, ``kill -9`` or a power cut it names a subset of what is
    really there. A journal that is missing, unreadable, or for another sha256/size means: start
    over. Files of one range or less keep it in memory only (``durable=False``): nothing to resume."""

    def __init__(self, partial: Path, sha256: str, size: int, done: list[tuple[int, int]], *, durable: bool) -> None:
        self.partial, self.path = partial, self.path_for(partial)
        self.sha256, self.size, self.durable = sha256, size, durable
        self.done = done
        self._lock = threading.Lock()

    @staticmethod
    def path_for(partial: Path) -> Path:
        return partial.with_name(partial.name + ".json")

    @classmethod
    def open(cls, partial: Path, sha256: str, size: int, *, durable: bool) -> _RangeJournal:
        """The journal of an earlier attempt at this very file, or a fresh start: the journal goes
        first (a crash must never leave an old journal beside new bytes), then a pre-sized partial."""
        resumed = cls._resume(partial, sha256, size)
        if resumed is not None:
            return resumed
        path = cls.path_for(partial)
        if path.exists() or partial.exists():
            log.info("%s: no journal for sha256 %s: downloading it from the start", partial.name, sha256)
        path.unlink(missing_ok=True)
        with open(partial, "wb") as f:
            f.truncate(size)
        journal = cls(partial, sha256, size, [], durable=durable)
        journal._save()
        return journal

    @classmethod
    def _resume(cls, partial: Path, sha256: str, size: int) -> _RangeJournal | None:
        try:
            doc = json.loads(cls.path_for(partial).read_text())
            done = [(int(start), int(end)) for start, end in doc["done"]]
            same = doc["version"] == JOURNAL_VERSION and doc["sha256"] == sha256 and doc["size"] == size
            if not same or partial.stat().st_size != size or any(not 0 <= a < b <= size for a, b in done):
                return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(partial, sha256, size, _merge(done), durable=True)

    @property
    def durable_bytes(self) -> int:
        return sum(end - start for start, end in self.done)

    def plan(self, piece: int) -> list[tuple[int, int, bool]]:
        """``[0, size)`` in order as ``(start, end, present)``: recorded ranges whole, the holes
        between them cut into pieces of at most ``piece`` bytes (one ranged GET each)."""
        out: list[tuple[int, int, bool]] = []
        pos = 0
        for start, end in [*self.done, (self.size, self.size)]:
            out += [(s, min(s + piece, start), False) for s in range(pos, start, piece)]
            if start < end:
                out.append((start, end, True))
            pos = end
        return out

    def record(self, fd: int, start: int, end: int) -> None:
        """``[start, end)`` was written through ``fd``: flush it to disk, then note it."""
        if self.durable:
            getattr(os, "fdatasync", os.fsync)(fd)  # fdatasync is Linux-only
        with self._lock:
            self.done = _merge([*self.done, (start, end)])
            self._save()

    def _save(self) -> None:
        if not self.durable:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        doc = {"version": JOURNAL_VERSION, "sha256": self.sha256, "size": self.size, "done": self.done}
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def finish(self, target: Path) -> None:
        os.replace(self.partial, target)
        self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


class _DownloadStopped(Exception):
    """Another file of the same download failed (or Ctrl-C): start no further ranges."""


def _hash_range(fd: int, start: int, end: int, h: Any) -> None:
    """Feed ``[start, end)`` of ``fd`` into ``h``; a file cut short just ends early (the hash then differs)."""
    pos = start
    while pos < end and (data := os.pread(fd, min(CHUNK, end - pos), pos)):
        h.update(data)
        pos += len(data)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class HashCache:
    """sha256 of local files keyed by (path, size, mtime_ns, inode): re-saving a directory that did
    not change costs a ``stat`` per file instead of a full read. Lives in
    ``$WEIGHTSTORE_CACHE_DIR`` (default ``~/.cache/weightstore``); any error just means a miss."""

    def __init__(self, directory: Path | None = None) -> None:
        root = directory or Path(os.environ.get("WEIGHTSTORE_CACHE_DIR") or Path.home() / ".cache" / "weightstore")
        self.path = root / "sha256-cache.sqlite"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=5)
        conn.execute("create table if not exists h (path text primary key, size int, mtime int, ino int, sha text)")
        return conn

    def sha256(self, src: Path) -> tuple[int, str]:
        st = src.stat()
        key = str(src.resolve())
        try:
            with self._connect() as conn:
                row = conn.execute("select size, mtime, ino, sha from h where path = ?", (key,)).fetchone()
        except Exception:  # noqa: BLE001 - the cache is an optimisation only
            row = None
        if row and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ino):
            return st.st_size, str(row[3])
        digest = sha256_file(src)
        try:
            with self._connect() as conn:
                conn.execute(
                    "insert or replace into h values (?, ?, ?, ?, ?)", (key, st.st_size, st.st_mtime_ns, st.st_ino, digest)
                )
        except Exception:  # noqa: BLE001
            pass
        return st.st_size, digest


def _digest(src: FileSource, cache: HashCache | None = None) -> tuple[int, str]:
    if isinstance(src, bytes | bytearray):
        return len(src), hashlib.sha256(src).hexdigest()
    if cache is not None:
        return cache.sha256(Path(src))
    return src.stat().st_size, sha256_file(src)


def _chunks(src: FileSource, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    if isinstance(src, bytes | bytearray):
        for i in range(0, len(src), CHUNK):
            piece = bytes(src[i : i + CHUNK])
            if progress:
                progress(len(piece))
            yield piece
        return
    with open(src, "rb") as f:
        while data := f.read(CHUNK):
            if progress:
                progress(len(data))
            yield data


class _ProgressReader:
    """A file object for a streamed request body that reports progress as it is read."""

    def __init__(self, f: Any, progress: Callable[[int], None]) -> None:
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.f.read(max(n, CHUNK) if n > 0 else n)
        self.progress(len(data))
        return data


def _backoff(attempt: int) -> float:
    return float(min(BACKOFF_S * 2**attempt, 4.0))


def _read_part(src: FileSource, offset: int, length: int) -> bytes:
    if isinstance(src, bytes | bytearray):
        return bytes(src[offset : offset + length])
    with open(src, "rb") as f:
        f.seek(offset)
        return f.read(length)


class _LeaseKeeper:
    """Renews one open upload's lease from a daemon thread every third of ``lease_seconds`` until
    stopped (``uploads`` module doc). A failed renewal is logged and tried again at the next tick;
    an upload that is gone or lapsed stops it (the commit then says so and the upload is declared
    again). ``lease_seconds`` 0 (a server without leases): does nothing."""

    def __init__(self, client: Client, upload_id: str, lease_seconds: float) -> None:
        self.client, self.upload_id = client, upload_id
        self.interval = max(0.5, lease_seconds / 3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if lease_seconds > 0:
            self._thread = threading.Thread(target=self._run, name=f"lease-{upload_id}", daemon=True)
        self.renewals = 0

    def start(self) -> None:
        if self._thread is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.client._call("POST", f"/v1/uploads/{self.upload_id}/renew", idempotent=True, deadline_s=self.interval)
                self.renewals += 1
            except (UploadExpired, NotFound) as exc:
                log.warning("upload %s can no longer be renewed: %s", self.upload_id, exc)
                return
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried at the next tick
                log.warning("renewing upload %s failed (%s); trying again in %.0f s", self.upload_id, exc, self.interval)


class Client:
    def __init__(
        self,
        base_url: str | list[str] | None = None,
        api_key: str | None = None,
        *,
        retry_deadline: float | None = None,
        timeout: float = 300,
        transfer: str = "auto",
        progress: bool | None = None,
        parallel: int = 4,
        hash_cache: HashCache | None | bool = True,
        range_part: int = RANGE_PART,
    ) -> None:
        self.base_urls = parse_base_urls(base_url)
        self.base_url = self.base_urls[0]  # the first replica (what messages name); see _current
        self._current = 0  # index of the replica that answered last: calls go there first
        if retry_deadline is None:
            retry_deadline = float(os.environ.get("WEIGHTSTORE_RETRY_DEADLINE_SECONDS") or RETRY_DEADLINE_S)
        self.retry_deadline = retry_deadline
        key = api_key or os.environ.get("WEIGHTSTORE_API_KEY")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}")
        self.transfer = transfer
        self._store_unreachable = False  # "auto" learned that presigned URLs cannot be reached from here
        # None = auto: progress bars on stderr when it is a terminal (never in pipes, logs or CI).
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.parallel = parallel
        self.hash_cache = HashCache() if hash_cache is True else (hash_cache or None)
        self.range_part = range_part
        headers = {"X-API-Key": key} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        # Presigned URLs carry their own auth: never send our API key to the object store.
        self.raw = RawHTTP(timeout, maxsize=max(16, parallel * 2))
        # Verified parallel reads (issue 14): loads into memory, and chunked files of `download`.
        self.loader = VerifiedLoader(self.raw, connections=max(1, parallel * 2), legacy_piece=range_part)

    def close(self) -> None:
        self.http.close()
        self.raw.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool | None = None,
        content: Callable[[], Any] | None = None,
        deadline_s: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send ``method url`` to the replicas in turn until one answers with something other than
        502/503/504, following the module doc's rule. ``idempotent`` overrides the method's own
        semantics (calls that the protocol makes safe to repeat); ``content`` makes a fresh request
        body per attempt (a stream can be read once). Returns the last answer, error or not; raises
        ``ServiceUnavailable`` when no replica answered in time or repeating was not safe."""
        safe = method.upper() in IDEMPOTENT_METHODS if idempotent is None else idempotent
        budget = self.retry_deadline if deadline_s is None else deadline_s
        deadline = time.monotonic() + budget
        n = len(self.base_urls)
        failures = 0
        maybe_applied = False  # an earlier attempt may have reached a server
        last: httpx.TransportError | None
        while True:
            index = self._current
            base = self.base_urls[index]
            try:
                if content is not None:
                    kwargs["content"] = content()
                r = self.http.request(method, base + url, **kwargs)
            except httpx.TransportError as exc:
                sent = not isinstance(exc, NOT_SENT)
                if sent and not safe:
                    raise ServiceUnavailable(
                        f"{method} {url}: the connection to {base} broke after the request was sent ({type(exc).__name__}); "
                        "it may or may not have been applied: check before repeating it"
                    ) from exc
                maybe_applied = maybe_applied or sent
                wait, why, last = 0.0, f"{type(exc).__name__} from {base}", exc
            else:
                if r.status_code not in FAILOVER_STATUSES or not safe:
                    if maybe_applied and method.upper() == "DELETE" and r.status_code == 404:
                        return httpx.Response(204, request=r.request)  # the earlier attempt deleted it
                    return r
                wait, why, last = _retry_after(r), f"HTTP {r.status_code} from {base}", None
                maybe_applied = maybe_applied or r.status_code != 503  # a gateway error: it may have run
            failures += 1
            if self._current == index:  # another thread may have moved on already
                self._current = (index + 1) % n
            if failures % n == 0:  # every replica failed once more: back off before the next round
                wait = max(wait, _jittered(failures // n - 1))
            # The whole budget is used: a wait that would run past the deadline is cut short so the
            # last attempt is made at the deadline; only a failure at or after it is final.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if last is None:
                    return r  # the service's own typed error (e.g. catalog_busy): raised by the caller
                where = ", ".join(self.base_urls)
                raise ServiceUnavailable(
                    f"no weightstore server at {where} answered within {budget:g} s ({why}); "
                    "start `weightstore serve` or set WEIGHTSTORE_URL"
                ) from last
            wait = min(wait, remaining)
            log.info("%s %s: %s; retrying in %.2f s", method, url, why, wait)
            time.sleep(wait)

    def _call(
        self, method: str, url: str, *, idempotent: bool | None = None, deadline_s: float | None = None, **kwargs: Any
    ) -> Any:
        r = self._request(method, url, idempotent=idempotent, deadline_s=deadline_s, **kwargs)
        _raise_for(r)
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else None

    # --- runs ---------------------------------------------------------------------------------
    def create_run(
        self,
        base_model: str,
        *,
        run_id: str | None = None,
        lora_rank: int | None = None,
        user_metadata: dict[str, str] | None = None,
        **lora: bool,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "base_model": base_model,
            "run_id": run_id,
            "lora_rank": lora_rank,
            "user_metadata": user_metadata,
            **lora,
        }
        return dict(self._call("POST", "/v1/runs", json={k: v for k, v in body.items() if v is not None}))

    def list_runs(self, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/runs", params={"limit": limit, "offset": offset}))

    # --- upload -------------------------------------------------------------------------------
    def upload(
        self,
        run_id: str,
        kind: str,
        name: str,
        files: Mapping[str, FileSource],
        *,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
        transfer: str | None = None,
    ) -> dict[str, Any]:
        """Declare → send what the service does not have → commit. Returns the commit answer
        (``tinker_path``, ``checkpoint``, ``bytes_received``)."""
        mode = transfer or self.transfer
        for p in files:
            check_file_path(p)
        # Hash files in parallel (hashlib releases the GIL): the declare needs every digest first.
        with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1, 8))) as pool:
            digests = dict(zip(files, pool.map(lambda src: _digest(src, self.hash_cache), files.values()), strict=True))
        body = {
            "run_id": run_id,
            "kind": kind,
            "name": name,
            "ttl_seconds": ttl_seconds,
            "overwrite": overwrite,
            "user_metadata": user_metadata,
            "files": [{"path": p, "size_bytes": s, "sha256": h} for p, (s, h) in sorted(digests.items())],
        }
        if mode != "auto":
            return self._upload_once({**body, "transfer": mode}, files, name)
        try:
            return self._upload_once({**body, "transfer": "stream" if self._store_unreachable else "presigned"}, files, name)
        except StoreUnavailable as exc:
            if not getattr(exc, "unreachable", False) or self._store_unreachable:
                raise
            log.warning("object store unreachable from this client (%s): sending through the service instead", exc)
            self._store_unreachable = True
            return self._upload_once({**body, "transfer": "stream"}, files, name)

    def _upload_once(self, body: dict[str, Any], files: Mapping[str, FileSource], name: str) -> dict[str, Any]:
        for attempt in range(DECLARE_ATTEMPTS):
            try:
                return self._declare_send_commit(body, files, name)
            except (UploadIncomplete, UploadExpired) as exc:
                # Within one upload the commit loop already re-sent what it could; a fresh upload is
                # the last resort (the upload expired, or the store kept losing the bytes).
                if attempt == DECLARE_ATTEMPTS - 1:
                    raise
                log.warning("%s: declaring again (%s)", name, exc)
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def _declare_send_commit(self, body: dict[str, Any], files: Mapping[str, FileSource], name: str) -> dict[str, Any]:
        # idempotent by protocol (module doc): a duplicate declare is an unrenewed lease, closed by the collector
        ans = self._call("POST", "/v1/uploads", json=body, idempotent=True)
        keeper = _LeaseKeeper(self, ans["upload_id"], ans.get("lease_seconds") or 0)
        todo = [f for f in ans["files"] if f["transfer"] != "present"]
        bar = tqdm(
            total=sum(f["size_bytes"] for f in todo),
            unit="B",
            unit_scale=True,
            desc=f"upload {name}",
            disable=not self.progress or not todo,
            leave=True,  # one final line stays: what was sent
        )
        try:
            upload_id = ans["upload_id"]
            keeper.start()
            self._send_all(upload_id, todo, files, bar.update)
            for attempt in range(COMMIT_ATTEMPTS):
                try:
                    # idempotent by protocol: committing a committed upload answers its checkpoint
                    return dict(self._call("POST", f"/v1/uploads/{upload_id}/commit", idempotent=True))
                except UploadIncomplete as exc:
                    # Bytes we sent could not be proven ours (another tenant's identical PUT replaced
                    # them at the blob key, or the collector reclaimed them): the service re-offers
                    # exactly those files at this upload's own keys; send them there and commit again.
                    paths = [p for p in (exc.details.get("files") or []) if p in files]
                    if not paths or attempt == COMMIT_ATTEMPTS - 1:
                        raise
                    log.info("%s: sending %s again (%s)", name, ", ".join(paths), exc)
                    time.sleep(_backoff(attempt))
                    again = [self._call("GET", f"/v1/uploads/{upload_id}/files/{p}/transfer") for p in paths]
                    bar.total = (bar.total or 0) + sum(a["size_bytes"] for a in again if a["transfer"] != "present")
                    self._send_all(upload_id, [a for a in again if a["transfer"] != "present"], files, bar.update)
            raise AssertionError("unreachable")
        except BaseException:
            keeper.stop()
            # Close it now through any replica that answers; if none does soon, its lease lapses anyway.
            with contextlib.suppress(Exception):  # (an error if it was committed after all: ignored)
                self._call("DELETE", f"/v1/uploads/{ans['upload_id']}", deadline_s=min(5.0, self.retry_deadline))
            raise
        finally:
            keeper.stop()
            bar.close()

    def _send_all(
        self, upload_id: str, todo: list[dict[str, Any]], files: Mapping[str, FileSource], progress: Callable[[int], None]
    ) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(todo) or 1))) as pool:
            for fut in [pool.submit(self._send, upload_id, f, files[f["path"]], progress) for f in todo]:
                fut.result()

    def _send(self, upload_id: str, answer: dict[str, Any], src: FileSource, progress: Callable[[int], None]) -> None:
        for attempt in range(RETRIES):
            try:
                return self._send_once(upload_id, answer, src, progress)
            except WeightstoreError as exc:
                # Retry only what the service marks transient (store hiccup, blob being collected).
                if not exc.retryable or attempt == RETRIES - 1 or answer["transfer"] != "stream":
                    raise
                time.sleep(min(2**attempt, 10))

    def _send_once(self, upload_id: str, answer: dict[str, Any], src: FileSource, progress: Callable[[int], None]) -> None:
        if answer["transfer"] == "stream":
            # A PUT of the declared bytes: repeated on another replica if one dies mid-body (module doc).
            r = self._request(
                "PUT",
                f"/v1/uploads/{upload_id}/files/{answer['path']}",
                content=lambda: _chunks(src, progress),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(answer["size_bytes"])},
            )
            _raise_for(r)
            return
        if answer.get("part_size"):
            self._send_parts(upload_id, answer, src, progress)
            return
        headers = {**(answer.get("headers") or {}), "Content-Length": str(answer["size_bytes"])}
        if isinstance(src, bytes | bytearray):
            self.raw.request("PUT", answer["url"], body=bytes(src), headers=headers)
            progress(len(src))
            return
        with open(src, "rb") as f:  # streamed from disk: a multi-GiB file never sits in memory
            self.raw.request("PUT", answer["url"], body=_ProgressReader(f, progress), headers=headers)

    def _send_parts(self, upload_id: str, answer: dict[str, Any], src: FileSource, progress: Callable[[int], None]) -> None:
        """Presigned multipart: the declare answer carries the first page of part URLs (maybe none);
        later pages are asked for as the earlier ones are sent, so no URL waits long enough to expire."""
        size, psize = answer["size_bytes"], answer["part_size"]
        count = answer.get("part_count") or len(answer["part_urls"])

        def put_part(n_url: tuple[int, str]) -> None:
            n, url = n_url  # 1-based part number
            offset = (n - 1) * psize
            data = _read_part(src, offset, min(psize, size - offset))
            self.raw.request("PUT", url, body=data)
            progress(len(data))

        page = answer
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            while True:
                first = int(page.get("first_part") or 1)
                list(pool.map(put_part, enumerate(page["part_urls"], start=first)))
                nxt = first + len(page["part_urls"])
                if nxt > count:
                    return
                page = self._call("GET", f"/v1/uploads/{upload_id}/files/{answer['path']}/transfer", params={"first_part": nxt})
                if not page.get("part_urls"):
                    raise IntegrityError(f"{answer['path']}: the service answered no part URLs from part {nxt}")

    # --- the upload protocol step by step (the ranks of a DCP save: weightstore.integrations.dcp) ---
    def _rank_transfer(self) -> str:
        return "stream" if self.transfer == "stream" or self._store_unreachable else "presigned"

    def declare_upload(
        self,
        run_id: str,
        kind: str,
        name: str,
        files: Mapping[str, tuple[int, str]] | None = None,
        *,
        layout: str | None = None,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Declare an upload (``files``: path -> (size, sha256)); ``layout="dcp"`` allows none yet."""
        body: dict[str, Any] = {
            "run_id": run_id,
            "kind": kind,
            "name": name,
            "ttl_seconds": ttl_seconds,
            "overwrite": overwrite,
            "user_metadata": user_metadata,
            "layout": layout,
            "transfer": self._rank_transfer(),
            "files": [{"path": p, "size_bytes": n, "sha256": h} for p, (n, h) in sorted((files or {}).items())],
        }
        return dict(self._call("POST", "/v1/uploads", json=body, idempotent=True))

    def add_upload_files(self, upload_id: str, files: Mapping[str, tuple[int, str]]) -> list[dict[str, Any]]:
        """Add files (path -> (size, sha256)) to an open upload; returns one transfer answer per file."""
        body = {
            "files": [{"path": p, "size_bytes": n, "sha256": h} for p, (n, h) in sorted(files.items())],
            "transfer": self._rank_transfer(),
        }
        return list(self._call("POST", f"/v1/uploads/{upload_id}/files", json=body)["files"])

    def send_upload_files(self, upload_id: str, answers: list[dict[str, Any]], files: Mapping[str, FileSource]) -> int:
        """Send the bytes of the answered files the service does not hold; returns the bytes sent."""
        todo = [a for a in answers if a["transfer"] != "present"]
        self._send_all(upload_id, todo, files, lambda n: None)
        return sum(int(a["size_bytes"]) for a in todo)

    def commit_upload(self, upload_id: str, *, expect_files: list[str] | None = None) -> dict[str, Any]:
        """Commit an open upload (idempotent); ``expect_files``: refuse unless it holds exactly these."""
        body = {"expect_files": expect_files} if expect_files is not None else None
        return dict(self._call("POST", f"/v1/uploads/{upload_id}/commit", json=body, idempotent=True))

    def abort_upload(self, upload_id: str) -> None:
        """Close an open upload now (best effort: an error is ignored; the lease lapses anyway)."""
        with contextlib.suppress(Exception):
            self._call("DELETE", f"/v1/uploads/{upload_id}", deadline_s=min(5.0, self.retry_deadline))

    def upload_dir(self, directory: str | Path, *, run_id: str, kind: str, name: str, **kw: Any) -> dict[str, Any]:
        root = Path(directory)
        files: dict[str, FileSource] = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        return self.upload(run_id, kind, name, files, **kw)

    # --- Tinker-style save/load ---------------------------------------------------------------
    @staticmethod
    def _weights_files(
        weights: Mapping[str, torch.Tensor] | str | Path, adapter_config: dict[str, Any] | None
    ) -> dict[str, FileSource]:
        if isinstance(weights, str | Path):
            root = Path(weights)
            return {p.name: p for p in sorted(root.iterdir()) if p.is_file()}
        if adapter_config is None:
            raise ValueError("adapter_config (at least r and lora_alpha) is required with a tensor dict")
        from weightstore import tensorio

        cfg = json.dumps(adapter_config, sort_keys=True, indent=2).encode()
        return {ADAPTER_WEIGHTS: tensorio.weights_bytes(dict(weights)), ADAPTER_CONFIG: cfg}

    def save_state(
        self,
        run_id: str,
        name: str,
        weights: Mapping[str, torch.Tensor] | str | Path,
        optimizer_state: dict[str, Any] | torch.optim.Optimizer | None = None,
        *,
        adapter_config: dict[str, Any] | None = None,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
        model: torch.nn.Module | None = None,
    ) -> str:
        """Full state (weights + optimizer) at ``tinker://run/weights/name``.

        The optimizer file records ``param_names`` in optimizer index order
        (``tensorio.optimizer_param_names_for``): from the optimizer itself when it was built from
        ``named_parameters()``, else from ``model`` by identity, else from ``weights`` when they are
        the parameters or views of them (``model.state_dict()``); otherwise none rather than a guess."""
        from weightstore import tensorio

        files = self._weights_files(weights, adapter_config)
        if optimizer_state is not None:
            sd = optimizer_state if isinstance(optimizer_state, dict) else optimizer_state.state_dict()
            tensors = weights if isinstance(weights, Mapping) else None
            names = tensorio.optimizer_param_names_for(optimizer_state, model=model, weights=tensors)
            files[OPTIMIZER_STATE] = tensorio.optimizer_bytes(sd, param_names=names)
        elif OPTIMIZER_STATE not in files:
            raise ValueError("save_state needs optimizer_state (or a directory containing optimizer.safetensors)")
        return str(
            self.upload(
                run_id, "training", name, files, ttl_seconds=ttl_seconds, overwrite=overwrite, user_metadata=user_metadata
            )["tinker_path"]
        )

    def save_weights_for_sampler(
        self,
        run_id: str,
        name: str,
        weights: Mapping[str, torch.Tensor] | str | Path,
        *,
        adapter_config: dict[str, Any] | None = None,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> str:
        """Weights only at ``tinker://run/sampler_weights/name``."""
        files = self._weights_files(weights, adapter_config)
        files.pop(OPTIMIZER_STATE, None)
        return str(
            self.upload(run_id, "sampler", name, files, ttl_seconds=ttl_seconds, user_metadata=user_metadata)["tinker_path"]
        )

    def read_file(self, tinker_path: str, file: str) -> bytes:
        urls = {f["path"]: f for f in self.file_urls(tinker_path)["files"]}
        if file not in urls:
            raise IntegrityError(f"{tinker_path} has no file {file}")
        info = urls[file]
        bar = tqdm(
            total=info["size_bytes"], unit="B", unit_scale=True, desc=f"load {file}", disable=not self.progress, leave=True
        )
        r = self.raw.request("GET", info["url"], stream=True)
        try:
            pieces = []
            for piece in r.stream(CHUNK):
                pieces.append(piece)
                bar.update(len(piece))
            data = b"".join(pieces)
        finally:
            r.release_conn()
            bar.close()
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise IntegrityError(f"{file}: downloaded bytes do not match sha256 {info['sha256']}")
        return data

    def _load_buffers(self, tinker_path: str, names: list[str]) -> dict[str, Any]:
        """The verified bytes of these files, each in one buffer filled straight from ranged GETs
        (``weightstore.loader``: per-chunk sha256s where recorded, else the whole-file sha256)."""
        answer = {f["path"]: f for f in self.file_urls(tinker_path)["files"]}
        if DCP_METADATA in answer:
            raise InvalidRequest(
                f"{tinker_path} is a PyTorch Distributed Checkpoint (layout dcp): load it with dcp.load(..., "
                "storage_reader=weightstore.integrations.dcp.WeightstoreStorageReader(...))"
            )
        for name in names:
            if name not in answer:
                raise NotFound(f"{tinker_path} has no file {name}")
        out: dict[str, Any] = {}
        for name in names:
            spec = FileSpec.from_answer(answer[name])
            with tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"load {name}", disable=not self.progress) as bar:

                def advance(start: int, end: int, bar: tqdm[Any] = bar) -> None:
                    bar.update(end - start)

                out[name] = self.loader.load_bytes(spec, on_range=advance)
        return out

    def load_weights(self, tinker_path: str, device: str | None = None) -> dict[str, torch.Tensor]:
        """The checkpoint's weights, every byte verified, built on the downloaded buffer without a
        copy (no temp file); ``device`` (e.g. ``"cuda"``) copies each tensor there."""
        buf = self._load_buffers(tinker_path, [ADAPTER_WEIGHTS])[ADAPTER_WEIGHTS]
        return tensors_from_buffer(buf, device)

    def load_state(self, tinker_path: str, device: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """(weights, optimizer state dict or None for a sampler checkpoint), every byte verified
        (``load_weights``); optimizer tensors are built on their buffer too."""
        from weightstore import tensorio

        training = TinkerPath.parse(tinker_path).kind == "training"
        names = [ADAPTER_WEIGHTS, OPTIMIZER_STATE] if training else [ADAPTER_WEIGHTS]
        bufs = self._load_buffers(tinker_path, names)
        weights = tensors_from_buffer(bufs[ADAPTER_WEIGHTS], device)
        if not training:
            return weights, None
        opt = bufs[OPTIMIZER_STATE]
        return weights, tensorio.load_optimizer(opt, tensors=tensors_from_buffer(opt, device))

    # --- checkpoints --------------------------------------------------------------------------
    @staticmethod
    def _path_url(tinker_path: str) -> str:
        p = TinkerPath.parse(tinker_path)
        return f"/v1/checkpoints/{p.run_id}/{p.checkpoint_id}"

    def get_checkpoint(self, tinker_path: str) -> dict[str, Any]:
        return dict(self._call("GET", self._path_url(tinker_path)))

    def list_checkpoints(
        self, *, run_id: str | None = None, kind: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        params = {k: v for k, v in {"run_id": run_id, "kind": kind, "limit": limit, "offset": offset}.items() if v is not None}
        return dict(self._call("GET", "/v1/checkpoints", params=params))

    def file_urls(self, tinker_path: str) -> dict[str, Any]:
        return dict(self._call("GET", self._path_url(tinker_path) + "/files"))

    def delete(self, tinker_path: str) -> None:
        self._call("DELETE", self._path_url(tinker_path))

    def set_ttl(self, tinker_path: str, ttl_seconds: int | None) -> dict[str, Any]:
        return dict(self._call("PUT", self._path_url(tinker_path) + "/ttl", json={"ttl_seconds": ttl_seconds}))

    # --- retention policies and pins (weightstore.policies) -----------------------------------
    def pin(self, tinker_path: str) -> dict[str, Any]:
        """Never expire the checkpoint by policy or TTL (its TTL is cleared)."""
        return dict(self._call("POST", self._path_url(tinker_path) + "/pin"))

    def unpin(self, tinker_path: str, *, ttl_seconds: int | None = None) -> dict[str, Any]:
        return dict(self._call("POST", self._path_url(tinker_path) + "/unpin", json={"ttl_seconds": ttl_seconds}))

    def set_retention(
        self, *, run_id: str | None = None, tenant: str | None = None, keep_last: int | None = None, keep_every: int | None = None
    ) -> dict[str, Any]:
        """A run's policy (``run_id``) or a tenant default (``tenant``)."""
        url = f"/v1/runs/{run_id}/retention" if run_id is not None else f"/v1/tenants/{tenant}/retention"
        return dict(self._call("PUT", url, json={"keep_last": keep_last, "keep_every": keep_every}))

    def clear_retention(self, *, run_id: str | None = None, tenant: str | None = None) -> dict[str, Any] | None:
        """Remove a run's policy (answers what applies now) or a tenant default."""
        url = f"/v1/runs/{run_id}/retention" if run_id is not None else f"/v1/tenants/{tenant}/retention"
        out = self._call("DELETE", url)
        return None if out is None else dict(out)

    def retention(self, *, run_id: str | None = None, tenant: str | None = None) -> dict[str, Any] | None:
        """The policy in effect for a run, a tenant's default, or (neither) the list of policies."""
        if run_id is None and tenant is None:
            return dict(self._call("GET", "/v1/retention"))
        url = f"/v1/runs/{run_id}/retention" if run_id is not None else f"/v1/tenants/{tenant}/retention"
        out = self._call("GET", url)
        return None if out is None else dict(out)

    def download(self, tinker_path: str, dest: str | Path) -> Path:
        """Download every file into ``dest``, verifying sha256. Files go through ``<file>.partial``
        beside a journal of the byte ranges already on disk (``_RangeJournal``): an interrupted
        download resumes with only the missing ranges; files already complete are skipped. Bytes
        come as parallel ranged GETs (like boto3's download_file)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        files = self.file_urls(tinker_path)["files"]
        bar = tqdm(
            total=sum(f["size_bytes"] for f in files),
            unit="B",
            unit_scale=True,
            desc="download",
            disable=not self.progress,
            leave=True,  # one final line stays: what was fetched
        )
        # Set when one file fails or on Ctrl-C: the other files stop starting ranges, so the command
        # ends after the ranges in flight instead of after every file (what is done stays recorded).
        stop = threading.Event()
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(len(files), 4))) as pool:
                futures = [pool.submit(self._download_one, f, dest, bar.update, stop) for f in files]
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:
                    stop.set()
                    raise
        finally:
            bar.close()
        return dest

    def _fill(self, url: str, journal: _RangeJournal, progress: Callable[[int], None], stop: threading.Event) -> str:
        """Fetch the ranges the journal lacks as parallel ranged GETs, each written in place and
        recorded once flushed; return the sha256 of the whole file, hashed in order as ranges
        arrive. Ranges already present are read back once for the hash; fetched ones never are."""
        plan = journal.plan(self.range_part)
        holes = iter([(start, end) for start, end, present in plan if not present])
        fd = os.open(journal.partial, os.O_RDWR)

        def fetch(start: int, end: int) -> memoryview:
            if stop.is_set():
                raise _DownloadStopped
            data = self.raw.get_range(url, start, end - 1)
            _pwrite_all(fd, data, start)
            journal.record(fd, start, end)
            progress(len(data))
            return data

        # A sliding window keeps `window` ranges in flight (no stall at batch edges) and bounds
        # what waits in memory for the in-order hash.
        h = hashlib.sha256()
        window = max(2, self.parallel * 2)
        pool = ThreadPoolExecutor(max_workers=window)
        try:
            pending = deque(pool.submit(fetch, *hole) for hole in islice(holes, window))
            for start, end, present in plan:
                if present:
                    _hash_range(fd, start, end, h)
                    continue
                data = pending.popleft().result()
                if (nxt := next(holes, None)) is not None:
                    pending.append(pool.submit(fetch, *nxt))
                h.update(data)
        finally:
            # On an error or Ctrl-C: ranges not started are dropped, those in flight finish and are
            # recorded, so the next attempt does not fetch them again.
            pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)
        return h.hexdigest()

    def _fill_chunked(
        self, spec: FileSpec, journal: _RangeJournal, progress: Callable[[int], None], stop: threading.Event
    ) -> None:
        """``_fill`` for files with chunk digests: the same journal (a range is recorded once
        written and flushed), every chunk verified on the thread that completed it; a chunk that
        changed on the local disk discards the partial (as a whole-file mismatch does)."""
        fd = os.open(journal.partial, os.O_RDWR)

        def written(start: int, end: int) -> None:
            journal.record(fd, start, end)
            progress(end - start)

        try:
            fill_file_chunked(
                self.loader,
                spec,
                fd,
                journal.plan(self.range_part),
                lambda url, first, last: self.raw.get_range(url, first, last),
                piece=self.range_part,
                on_written=written,
                stop=stop,
            )
        except IntegrityError:
            journal.discard()
            raise
        except Stopped as exc:
            raise _DownloadStopped from exc
        finally:
            os.close(fd)

    def _download_one(self, info: dict[str, Any], dest: Path, progress: Callable[[int], None], stop: threading.Event) -> None:
        target = dest / check_file_path(info["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        size, sha = info["size_bytes"], info["sha256"]
        partial = target.with_name(target.name + ".partial")
        if target.exists() and target.stat().st_size == size and sha256_file(target) == sha:
            _RangeJournal.path_for(partial).unlink(missing_ok=True)  # left if a crash came after the rename
            progress(size)
            return
        journal = _RangeJournal.open(partial, sha, size, durable=size > self.range_part)
        progress(journal.durable_bytes)
        spec = FileSpec.from_answer(info)
        if spec.chunked:  # issue 14: verified chunk by chunk as ranges land (weightstore.loader)
            self._fill_chunked(spec, journal, progress, stop)
            journal.finish(target)
            return
        if self._fill(info["url"], journal, progress, stop) != sha:
            # Only a complete file can mismatch here. The store verified these bytes when they were
            # committed (S8), so the fault is on the way or on this disk: say so, and start clean.
            journal.discard()
            raise IntegrityError(
                f"{info['path']}: the downloaded bytes do not match sha256 {sha} (changed in transit or on "
                "the local disk; the stored checkpoint was verified when it was saved). The partial file "
                "was removed: run the download again."
            )
        journal.finish(target)
