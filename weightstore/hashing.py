"""sha256 of local files, read in chunks (one implementation for the client and base models)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            h.update(data)
    return h.hexdigest()
