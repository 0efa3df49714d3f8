"""Llama and Mistral: dense decoder, Tinker names equal transformers names.

Llama 3.2 1B/3B tie their embeddings; the shared base-profile logic gives a tied base's merged
model its own ``lm_head`` (``tie_word_embeddings: false``).
"""

from __future__ import annotations

from typing import ClassVar

from weightstore.export._profile import FamilyProfile


class LlamaProfile(FamilyProfile):
    """Llama / Mistral dense models."""

    name: ClassVar[str] = "llama"
    description: ClassVar[str] = "Llama / Mistral (dense; tied or untied embeddings)"
    model_types: ClassVar[frozenset[str]] = frozenset({"llama", "mistral"})
