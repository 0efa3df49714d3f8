"""Loader tests run with 1 MiB chunks so a few-MiB file has several (issue 14, part 1)."""

from __future__ import annotations

import pytest

from weightstore.settings import Settings

MiB = 1024 * 1024


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"chunk_size_bytes": MiB})
