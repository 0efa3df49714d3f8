"""Pure unit tests: names, tinker paths, safetensors validation, settings, error codes."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load

from weightstore import errors, formats, tensorio
from weightstore.names import TinkerPath, check_file_path, check_name, check_run_id
from weightstore.settings import Settings


def test_tinker_path_grammar_matches_the_sdk():
    p = TinkerPath.parse("tinker://sess-1:train:0/weights/step-1")
    assert (p.run_id, p.kind, p.name, p.checkpoint_id) == ("sess-1:train:0", "training", "step-1", "weights/step-1")
    assert str(p) == "tinker://sess-1:train:0/weights/step-1"
    assert TinkerPath.parse("tinker://r/sampler_weights/a.b_c-d").kind == "sampler"
    assert TinkerPath.parse("tinker://r/external_weights/x").kind == "external"
    for bad in [
        "http://r/weights/x",
        "tinker://r/weights",
        "tinker://r/weights/x/y",
        "tinker://r/other/x",
        "tinker:///weights/x",
        "tinker://r/weights/..",
        "tinker://r w/weights/x",
    ]:
        with pytest.raises(errors.InvalidRequest):
            TinkerPath.parse(bad)


@pytest.mark.parametrize("name", ["step-1", "a.b_c", "X" * 128])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", ".", "..", "a b", "x" * 129, "ü", "a\x00"])
def test_bad_names(name):
    with pytest.raises(errors.InvalidName):
        check_name(name)


@pytest.mark.parametrize("path", ["a.json", "dir/a.safetensors", "a-b_c.d/e"])
def test_good_file_paths(path):
    assert check_file_path(path) == path


@pytest.mark.parametrize("path", ["", "/abs", "../x", "a/../b", "a//b", "a/./b", "a\\b", "a\x00", "x" * 256, "a/"])
def test_bad_file_paths(path):
    with pytest.raises(errors.InvalidPath):
        check_file_path(path)


def test_run_ids_allow_colons_only_from_the_charset():
    assert check_run_id("abc:train:0") == "abc:train:0"
    with pytest.raises(errors.InvalidName):
        check_run_id("a/b")


def _reader(data: bytes):
    return lambda start, n: data[start : start + n]


def test_safetensors_validation_accepts_our_writer_and_the_librarys():
    from safetensors.torch import save

    tensors = {"b": torch.zeros(3, dtype=torch.bfloat16), "a": torch.ones(2, 2), "empty": torch.zeros(0)}
    for data in (tensorio.st_save(tensors, {"k": "v"}), save(tensors)):
        header = formats.parse_safetensors_header(_reader(data), len(data), max_header=1 << 20)
        assert set(header) - {"__metadata__"} == {"a", "b", "empty"}


def test_deterministic_writer_round_trips_and_is_byte_stable():
    t = {"z": torch.randn(4, 3), "a": torch.arange(5, dtype=torch.int64), "h": torch.randn(2).half()}
    one, two = tensorio.st_save(t, {"b": "2", "a": "1"}), tensorio.st_save(dict(reversed(t.items())), {"a": "1", "b": "2"})
    assert one == two
    back = load(one)
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_header_cap_checked_before_reading_the_header():
    reads: list[tuple[int, int]] = []
    data = (10**9).to_bytes(8, "little")

    def reader(start: int, n: int) -> bytes:
        reads.append((start, n))
        return data[start : start + n]

    with pytest.raises(errors.InvalidFormat, match="cap"):
        formats.parse_safetensors_header(reader, 2 * 10**9, max_header=100 * 2**20)
    assert reads == [(0, 8)]


def test_required_files_per_kind():
    formats.check_file_set("sampler", ["adapter_model.safetensors", "adapter_config.json"])
    with pytest.raises(errors.InvalidFormat, match="optimizer"):
        formats.check_file_set("training", ["adapter_model.safetensors", "adapter_config.json"])


def test_settings_validate_at_start():
    with pytest.raises(ValueError):
        Settings(ttl_min_seconds=100, ttl_max_seconds=10)
    with pytest.raises(ValueError):
        Settings(port=0)
    s = Settings(data_dir="/tmp/x")
    assert s.resolved_database_url == "sqlite:////tmp/x/weightstore.db"


def test_error_codes_are_unique_and_round_trip():
    classes = errors._all_subclasses(errors.WeightstoreError)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert errors.error_for_code(cls.code) is cls
        err = cls("boom", file="x")
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is cls and again.message == "boom" and again.details == {"file": "x"}


def test_permanent_errors_never_map_to_retried_statuses():
    from weightstore_api.errors import status_for

    retried = {408, 409, 429} | set(range(500, 600))
    for cls in errors._all_subclasses(errors.WeightstoreError):
        status = status_for(cls("x"))
        if status in retried:
            # only retryable errors, the documented publish 409, and real invariant breaches
            assert cls.retryable or cls in {errors.Conflict, errors.DataLoss, errors.WeightstoreError}, cls
