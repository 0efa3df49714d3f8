"""Fixtures for the Tinker-compatibility tests: the real ``tinker`` SDK as the client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import sampler_files, state_files
from weightstore.client import Client

os.environ["TINKER_TELEMETRY"] = "0"


@pytest.fixture
def sdk(server, keys) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    import tinker

    yield tinker.RestClient(base_url=server.url, api_key=keys.trainer)


@pytest.fixture
def other_sdk(server, keys) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    import tinker

    yield tinker.RestClient(base_url=server.url, api_key=keys.other_trainer)


@dataclass
class Seeded:
    run_id: str
    paths: dict[str, str]
    """name -> tinker path: w1 (weights/step-1), s1 (sampler_weights/step-1), w2 (weights/step-2)"""


@pytest.fixture
def seeded(server, keys, clock) -> Seeded:  # type: ignore[no-untyped-def]
    """One run with three checkpoints, created a minute apart (so "newest first" is well defined)."""
    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-llama", lora_rank=4, user_metadata={"renderer_name": "llama3"})
    paths = {}
    for key, kind, name, files in [
        ("w1", "training", "step-1", state_files(1)),
        ("s1", "sampler", "step-1", sampler_files(1)),
        ("w2", "training", "step-2", state_files(2)),
    ]:
        paths[key] = c.upload(run["run_id"], kind, name, files)["tinker_path"]
        clock.advance(60)
    c.close()
    return Seeded(run["run_id"], paths)
