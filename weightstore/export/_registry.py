"""The family registry: which profile handles a base model, and the list of what is supported.

Families are listed explicitly (no import-time self-registration), so the support matrix is this
one tuple and an unknown architecture's error can name every known one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from weightstore.errors import InvalidRequest
from weightstore.export._gpt_oss import GptOssProfile
from weightstore.export._llama import LlamaProfile
from weightstore.export._profile import FamilyProfile
from weightstore.export._qwen import QwenProfile
from weightstore.export._qwen3_moe import Qwen3MoeProfile

PROFILES: tuple[FamilyProfile, ...] = (LlamaProfile(), QwenProfile(), Qwen3MoeProfile(), GptOssProfile())


@dataclass(frozen=True)
class FamilyInfo:
    """One supported model family."""

    name: str
    """Profile name, as reported in plans and results."""
    model_types: tuple[str, ...]
    """``config.json`` ``model_type`` values it handles."""
    description: str
    """Human-readable summary."""


def known_families() -> tuple[FamilyInfo, ...]:
    """Every supported family, in registry order."""
    return tuple(FamilyInfo(p.name, tuple(sorted(p.model_types)), p.description) for p in PROFILES)


def profile_for(config: Mapping[str, Any]) -> FamilyProfile:
    """The profile for a base model's ``config.json``; unknown architectures list the known ones."""
    for profile in PROFILES:
        if profile.matches(config):
            return profile
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in known_families())
    arch = config.get("model_type") or config.get("architectures") or "unknown"
    raise InvalidRequest(
        f"unsupported model architecture {arch!r}; known families: {known}",
        model_type=str(config.get("model_type")),
        known=[f.name for f in known_families()],
    )
