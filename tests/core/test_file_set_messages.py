"""The file-set refusal names a kind as users type it (issue 12, found: "the error for ``--kind state``
speaks of 'training'"), for every kind with required files."""

from __future__ import annotations

import pytest

from weightstore import formats
from weightstore.errors import InvalidFormat


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "training",
            "a full-state checkpoint (--kind state; tinker://RUN/weights/NAME) must contain optimizer.safetensors",
        ),
        (
            "sampler",
            "a sampler checkpoint (--kind sampler; tinker://RUN/sampler_weights/NAME) must contain adapter_config.json",
        ),
        ("external", "a PEFT export (tinker://RUN/external_weights/NAME) must contain adapter_config.json"),
        ("merged", "a merged-model export (tinker://RUN/merged_weights/NAME) must contain config.json"),
    ],
)
def test_missing_file_message_names_the_kind_users_type(kind: str, message: str) -> None:
    """issue 12, found (``--kind state`` error speaks of "training"): the exact text per kind."""
    present = ["adapter_model.safetensors"] if kind != "merged" else ["model.safetensors"]
    if kind == "training":
        present.append("adapter_config.json")
    with pytest.raises(InvalidFormat) as refused:
        formats.check_file_set(kind, present)
    assert refused.value.message == message
    assert "training" not in refused.value.message


def test_every_kind_with_required_files_has_a_user_label() -> None:
    """issue 12 (the class): no kind falls back to its catalog name in a message."""
    assert set(formats.REQUIRED_FILES) <= set(formats.KIND_LABELS)


@pytest.mark.parametrize("kind", ["sampler", "external"])
def test_weights_only_kinds_refuse_optimizer_state(kind: str) -> None:
    """README review (stop 17): ``upload --kind sampler`` of a full-state directory kept
    ``optimizer.safetensors`` silently, billed for bytes no sampler reads."""
    paths = ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"]
    with pytest.raises(InvalidFormat) as refused:
        formats.check_file_set(kind, paths)
    assert refused.value.message == (
        f"a {formats.kind_label(kind)} holds weights only: optimizer.safetensors belongs in a "
        "full-state checkpoint (--kind state; tinker://RUN/weights/NAME)"
    )
    formats.check_file_set("training", paths)  # the same set is a valid full-state checkpoint


def test_a_sampler_declare_with_optimizer_state_is_refused_before_any_byte(api) -> None:  # type: ignore[no-untyped-def]
    """The same rule at the service's door: a permanent 400 at declare, nothing recorded."""
    from tests.api.test_bad_input import decl
    from tests.helpers import state_files

    run_id = api.post("/v1/runs", json={"base_model": "tiny-llama"}).json()["run_id"]
    body = {"run_id": run_id, "kind": "sampler", "name": "s", "files": decl(state_files(3))}
    r = api.post("/v1/uploads", json=body)
    assert r.status_code == 400 and r.json()["code"] == "invalid_format", r.text
    assert "optimizer.safetensors belongs in a full-state checkpoint" in r.json()["message"]
    assert api.get("/v1/checkpoints").json()["checkpoints"] == []
