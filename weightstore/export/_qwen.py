"""Qwen2 / Qwen2.5 / Qwen3 dense: like Llama (q/k/v biases and q/k norms are never adapted).

Small Qwen models tie their embeddings (Qwen3-0.6B..4B, Qwen2.5-0.5B..3B), so ``unembed_tokens``
usually lands in a materialised ``lm_head`` of the merged model (see the base profile).
"""

from __future__ import annotations

from typing import ClassVar

from weightstore.export._profile import FamilyProfile


class QwenProfile(FamilyProfile):
    """Qwen2 / Qwen3 dense models."""

    name: ClassVar[str] = "qwen"
    description: ClassVar[str] = "Qwen2 / Qwen2.5 / Qwen3 dense (tied or untied embeddings)"
    model_types: ClassVar[frozenset[str]] = frozenset({"qwen2", "qwen3"})
