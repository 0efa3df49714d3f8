"""Issue 11, item 6 (run ids ``.`` and ``..``): every run id the one validator
(``weightstore.names.check_run_id``) accepts is addressable everywhere a run id travels: our
``TinkerPath``, the Tinker SDK's own path parser, and a URL path segment (native and Tinker routes).
Ids that are not (``.``, ``..``, a leading ``-`` that reads as a command-line option) are refused
with a 400 ``invalid_name`` when a run is created."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tinker.types.checkpoint import ParsedCheckpointTinkerPath

from weightstore.errors import InvalidName
from weightstore.names import KIND_BY_SEGMENT, SEGMENT_BY_KIND, TinkerPath, check_run_id

RUN_ID_CHARS = "abcXYZ019._:-"
ODD_CHARS = "/?#% \\\x00é~+"


def _accepted(run_id: str) -> bool:
    try:
        check_run_id(run_id)
    except InvalidName:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(
    run_id=st.one_of(
        st.text(alphabet=RUN_ID_CHARS, min_size=1, max_size=8),
        st.text(alphabet=RUN_ID_CHARS + ODD_CHARS, min_size=0, max_size=12),
        st.text(alphabet=RUN_ID_CHARS, min_size=195, max_size=205),
    ),
    kind=st.sampled_from(sorted(SEGMENT_BY_KIND)),
)
@example(run_id=".", kind="training")
@example(run_id="..", kind="sampler")
@example(run_id="-rf", kind="training")
@example(run_id="a:b:train:0", kind="training")
def test_every_accepted_run_id_is_addressable(run_id: str, kind: str) -> None:
    """issue 11, item 6: the class test. For every id the validator accepts: our path round-trips,
    the SDK parses the same run id back, and a URL path keeps the id as one segment."""
    if not _accepted(run_id):
        return
    path = TinkerPath(run_id, kind, "step-1")
    assert TinkerPath.parse(str(path)) == path
    if SEGMENT_BY_KIND[kind] in ("weights", "sampler_weights", "external_weights"):
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(str(path))
        assert parsed.training_run_id == run_id and parsed.checkpoint_id == path.checkpoint_id
    for route in (f"/v1/runs/{run_id}", f"/api/v1/training_runs/{run_id}/checkpoints/{path.checkpoint_id}"):
        assert httpx.URL("http://store" + route).path == route
    assert not run_id.startswith("-")  # a CLI reads it as an argument, not an option
    assert KIND_BY_SEGMENT[path.segment] == kind


@pytest.mark.parametrize("bad", [".", "..", "-x", ":x", "_x", "a/b", ""])
def test_unaddressable_run_ids_are_refused_at_creation(api, bad):
    """issue 11, item 6: creating a run with such an id is a clear 400, never a run that can be
    listed and billed but not reached."""
    r = api.post("/v1/runs", json={"base_model": "tiny-llama", "run_id": bad})
    if bad == "":  # no id: the server mints one
        assert r.status_code == 201 and r.json()["run_id"].endswith(":train:0")
        return
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_name"
    assert "must start with a letter or digit" in r.json()["message"] or "/" in bad
    assert all(run["run_id"] != bad for run in api.get("/v1/runs").json()["runs"])
