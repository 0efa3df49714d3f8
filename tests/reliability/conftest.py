"""Fixtures of the reliability harness: the seed (printed, replayable) and a tiny base model for exports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.exportjobs.builders import build_base
from tests.reliability.harness import SEED_ENV, seed_from_env


@pytest.fixture
def reliability_seed(request: pytest.FixtureRequest) -> int:
    seed = seed_from_env()
    # -s shows it at once; the assertion message of any failure repeats it.
    print(f"\nreliability seed: {SEED_ENV}={seed} ({request.node.nodeid})", flush=True)
    return seed


@pytest.fixture(scope="session")
def reliability_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("reliability-base") / "tiny-llama")
