"""Resumable downloads (issue 11, item 8): an interrupted ``download`` resumes from the byte ranges
that are known to be durable, and a ``.partial`` file is never taken for data on its own.

Every test uploads a 12 MiB file and downloads it in 1 MiB ranges, against the live server and
SeaweedFS of tests/conftest.py. Bytes fetched are counted at ``RawHTTP.get_range``, the only way
the download path reads from the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from weightstore import tensorio
from weightstore.client import Client
from weightstore.errors import IntegrityError, StoreUnavailable
from weightstore.formats import ADAPTER_WEIGHTS

MiB = 1024 * 1024
RANGE = MiB


BIG = tensorio.weights_bytes({"w": torch.randn(3 * MiB, generator=torch.Generator().manual_seed(7))})


@pytest.fixture
def big(server, keys) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    """(tinker path, bytes) of a checkpoint whose weights file is 12 MiB: twelve 1 MiB ranges and a bit."""
    weights = BIG
    assert len(weights) > 12 * MiB
    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-llama")["run_id"]
    files = {ADAPTER_WEIGHTS: weights, "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'}
    return str(c.upload(run, "sampler", "big", files)["tinker_path"]), weights


def _client(server, keys, **kw: object) -> Client:  # type: ignore[no-untyped-def]
    return Client(server.url, keys.trainer, range_part=RANGE, hash_cache=False, **kw)  # type: ignore[arg-type]


def _count_fetched(c: Client, before: Callable[[int], None] | None = None) -> list[int]:
    """Wrap ``c.raw.get_range`` for the big file (its blob key names its sha256): ``before(offset)``
    runs first; the list collects the length of every range read. Other files pass untouched."""
    fetched: list[int] = []
    real = c.raw.get_range
    big_sha = hashlib.sha256(BIG).hexdigest()

    def get_range(url: str, first: int, last: int) -> memoryview:
        if big_sha not in url:
            return real(url, first, last)
        if before is not None:
            before(first)
        data = real(url, first, last)
        fetched.append(len(data))
        return data

    c.raw.get_range = get_range  # type: ignore[method-assign]
    return fetched


def _journal(dest: Path) -> Path:
    return dest / f"{ADAPTER_WEIGHTS}.partial.json"


def _done(dest: Path) -> list[list[int]]:
    """The ranges the journal records as durable ([] when there is none)."""
    journal = _journal(dest)
    return list(json.loads(journal.read_text())["done"]) if journal.exists() else []


def _durable_bytes(dest: Path) -> int:
    return sum(end - start for start, end in _done(dest))


def _assert_finished(dest: Path, expected: bytes) -> None:
    assert (dest / ADAPTER_WEIGHTS).read_bytes() == expected
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", ADAPTER_WEIGHTS]  # no .partial, no journal


def test_interrupted_download_resumes_and_fetches_only_missing_ranges(server, keys, tmp_path, big):
    """issue 11, item 8: the HTTP layer fails after 4 ranges; the second run completes the same
    file byte-identically and reads fewer bytes than the whole file."""
    path, expected = big
    dest = tmp_path / "dl"
    first = _client(server, keys, parallel=1)
    calls = 0

    def fail_after_four(_offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls > 4:
            raise StoreUnavailable("connection reset (injected)")

    _count_fetched(first, fail_after_four)
    with pytest.raises(StoreUnavailable):
        first.download(path, dest)
    durable = _durable_bytes(dest)

    again = _client(server, keys)
    fetched = _count_fetched(again)
    again.download(path, dest)  # before the fix: integrity_mismatch, the pre-sized partial hashed as data
    _assert_finished(dest, expected)
    assert durable >= 2 * RANGE
    assert sum(fetched) == len(expected) - durable < len(expected)


CHILD = """
import os, sys, time
from weightstore.client import Client
url, key, path, dest, big_sha = sys.argv[1:]
c = Client(url, key, range_part=1024 * 1024, parallel=1, hash_cache=False)
real = c.raw.get_range
def slow(u, first, last):
    data = real(u, first, last)
    if big_sha in u:
        os.write(1, f"{first}\\n".encode())  # one write: lines from two threads never interleave
        time.sleep(0.2)
    return data
c.raw.get_range = slow
c.download(path, dest)
"""


def test_killed_download_resumes(server, keys, tmp_path, big):
    """issue 11, item 8: ``kill -9`` of a downloading process after some ranges landed; the next
    download completes byte-identically, reading fewer bytes than the whole file."""
    path, expected = big
    dest = tmp_path / "dl"
    err = (tmp_path / "child.err").open("w")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.url, keys.trainer, path, str(dest), hashlib.sha256(expected).hexdigest()],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "WEIGHTSTORE_CACHE_DIR": str(tmp_path / "cache")},
    )
    try:
        assert child.stdout is not None
        # Four ranges fetched: ranges start in order with two in flight, so range 3 started only
        # after ranges 0 and 1 were written and recorded.
        lines = [child.stdout.readline() for _ in range(4)]
        assert all(line.strip().isdigit() for line in lines), (lines, (tmp_path / "child.err").read_text())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        err.close()
    assert child.returncode == -signal.SIGKILL
    assert (dest / f"{ADAPTER_WEIGHTS}.partial").exists()
    durable = _durable_bytes(dest)

    c = _client(server, keys)
    fetched = _count_fetched(c)
    c.download(path, dest)
    _assert_finished(dest, expected)
    assert durable >= 2 * RANGE
    assert sum(fetched) == len(expected) - durable


def test_out_of_order_ranges_then_interruption_resume_correctly(server, keys, tmp_path, big):
    """issue 11, item 8: parallel ranged GETs land out of order (range 0 last); the interruption
    comes while range 0 is still missing, so what is durable is not a prefix. Resume fetches
    exactly the holes."""
    path, expected = big
    dest = tmp_path / "dl"
    first = _client(server, keys, parallel=4)  # eight ranges in flight
    later_done = threading.Semaphore(0)

    def hold_range_zero(offset: int) -> None:
        if offset == 0:
            for _ in range(3):  # three later ranges were written first
                assert later_done.acquire(timeout=30)
            time.sleep(0.2)
            raise StoreUnavailable("connection reset (injected)")

    fetched_first = _count_fetched(first, hold_range_zero)
    real = first.raw.get_range

    def release_after(url: str, a: int, b: int) -> memoryview:
        data = real(url, a, b)
        if a > 0:
            later_done.release()
        return data

    first.raw.get_range = release_after  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        first.download(path, dest)
    done = _done(dest)
    assert sum(fetched_first) >= 3 * RANGE

    again = _client(server, keys)
    fetched = _count_fetched(again)
    again.download(path, dest)
    _assert_finished(dest, expected)
    assert done and done[0][0] > 0  # not a prefix: range 0 never landed
    assert sum(fetched) == len(expected) - sum(end - start for start, end in done)


def _presized_partial(dest: Path, size: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / f"{ADAPTER_WEIGHTS}.partial", "wb") as f:
        f.truncate(size)  # what an interrupted download left before this fix: full size, mostly zeros


@pytest.mark.parametrize("journal", ["missing", "other-sha", "other-size", "unreadable", "out-of-bounds"])
def test_partial_without_a_matching_journal_is_started_over(server, keys, tmp_path, big, journal):
    """issue 11, item 8: a pre-sized ``.partial`` is not data. Without a journal for this very file
    (same sha256 and size, ranges inside it) it is discarded and the whole file is fetched."""
    path, expected = big
    dest = tmp_path / "dl"
    _presized_partial(dest, len(expected))
    everything = [[0, len(expected)]]
    contents = {
        "other-sha": {"version": 1, "sha256": "0" * 64, "size": len(expected), "done": everything},
        "other-size": {"version": 1, "sha256": None, "size": len(expected) + 1, "done": everything},
        "out-of-bounds": {"version": 1, "sha256": None, "size": len(expected), "done": [[0, len(expected) + 5]]},
    }
    if journal in contents:
        body = contents[journal]
        if body["sha256"] is None:
            body["sha256"] = _client(server, keys).file_urls(path)["files"][0]["sha256"]
        _journal(dest).write_text(json.dumps(body))
    elif journal == "unreadable":
        _journal(dest).write_text('{"version": 1, "sha256": ')
    c = _client(server, keys)
    fetched = _count_fetched(c)
    c.download(path, dest)
    _assert_finished(dest, expected)
    assert sum(fetched) >= len(expected)  # everything came from the store


def test_corrupt_durable_range_is_a_mismatch_that_a_retry_repairs(server, keys, tmp_path, big):
    """Only a complete download whose hash differs is ``integrity_mismatch``: the message says to
    retry, the partial and its journal are gone, and the retry succeeds."""
    path, expected = big
    dest = tmp_path / "dl"
    first = _client(server, keys, parallel=1)
    calls = 0

    def fail_after_four(_offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls > 4:
            raise StoreUnavailable("connection reset (injected)")

    _count_fetched(first, fail_after_four)
    with pytest.raises(StoreUnavailable):
        first.download(path, dest)
    partial = dest / f"{ADAPTER_WEIGHTS}.partial"
    with open(partial, "r+b") as f:  # a bit flips on disk inside a recorded range
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="download again"):
        _client(server, keys).download(path, dest)
    assert not partial.exists() and not _journal(dest).exists()
    _client(server, keys).download(path, dest)
    _assert_finished(dest, expected)


def test_small_files_and_empty_files_download(server, keys, tmp_path):
    """Files of one range or less (and of zero bytes) take the same path without a journal."""
    c = _client(server, keys)
    run = c.create_run("tiny-llama")["run_id"]
    from tests.helpers import sampler_files

    files = {**sampler_files(3), "notes/EMPTY": b"", "extra.safetensors": tensorio.weights_bytes({})}
    path = c.upload(run, "sampler", "small", files)["tinker_path"]
    dest = tmp_path / "dl"
    c.download(path, dest)
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert not list(dest.rglob("*.partial*"))


def test_a_failing_file_stops_the_other_files_of_the_download(server, keys, tmp_path):
    """One file failing (or Ctrl-C) ends the command after the ranges in flight, not after every
    other file: what landed stays recorded and the next run completes both files."""
    second = tensorio.weights_bytes({"v": torch.randn(3 * MiB, generator=torch.Generator().manual_seed(8))})
    c = _client(server, keys, parallel=1)
    run = c.create_run("tiny-llama")["run_id"]
    files = {ADAPTER_WEIGHTS: BIG, "adapter_config.json": b'{"r": 4, "lora_alpha": 8}', "second.safetensors": second}
    path = c.upload(run, "sampler", "two", files)["tinker_path"]
    second_sha = hashlib.sha256(second).hexdigest()
    real = c.raw.get_range
    second_fetched: list[int] = []

    def get_range(url: str, first: int, last: int) -> memoryview:
        if hashlib.sha256(BIG).hexdigest() in url and first >= 2 * RANGE:
            raise StoreUnavailable("connection reset (injected)")
        if second_sha in url:
            time.sleep(0.05)
            second_fetched.append(last - first + 1)
        return real(url, first, last)

    c.raw.get_range = get_range  # type: ignore[method-assign]
    dest = tmp_path / "dl"
    with pytest.raises(StoreUnavailable):
        c.download(path, dest)
    assert sum(second_fetched) < len(second) // 2
    fresh = _client(server, keys)
    fresh.download(path, dest)
    assert (dest / ADAPTER_WEIGHTS).read_bytes() == BIG and (dest / "second.safetensors").read_bytes() == second
