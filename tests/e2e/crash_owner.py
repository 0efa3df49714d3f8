"""Test helper for tests/e2e/test_crash_restart.py: own a SeaweedFS without a parent-death signal.

Run as ``python crash_owner.py DATA_DIR ACCESS SECRET``: starts the store with
``die_with_owner=False`` and no watchdog, prints ``ready <pid>``, then waits to be killed, so the
test can leave behind the orphan that a crashed owner leaves on a system without PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from weightstore.embedded import SeaweedFS


def main() -> None:
    data_dir, access, secret = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    weed = SeaweedFS(data_dir, access_key=access, secret_key=secret, die_with_owner=False, supervise=False)
    weed.start()
    print(f"ready {weed.pid}", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
