"""The handful of long-lived objects every service function needs, bundled once per process."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from weightstore.clock import Clock
from weightstore.objectstore import ObjectStore
from weightstore.settings import Settings


@dataclass
class Context:
    settings: Settings
    engine: Engine
    store: ObjectStore
    clock: Clock = field(default_factory=Clock)
