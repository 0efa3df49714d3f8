"""Reliability harness ("Jepsen-lite", issue 11): seeded random operations from concurrent clients of
several tenants against a real service, with faults, checked against invariants after every step.

Two scenarios, each on SQLite and PostgreSQL (the ``db_url`` fixture):

- **A, in process** (``test_inprocess.py``): the app under uvicorn in this process on a
  ``FakeClock``, the collector behind ``POST /v1/admin/gc/runs``, the export worker as a thread.
  Global operations: clock jumps (alone, between rounds) and collector runs (beside the clients).
  Ends with a full collection past grace and ``verify(expect_collected=True)`` with no finding at all.
- **B, processes** (``test_processes.py``): ``weightstore serve`` as `make serve` runs it (embedded
  SeaweedFS child, in-process export worker) and ``weightstore gc run`` processes. Faults: SIGKILL of
  ``serve`` mid-round, then a restart on the same data dir (the worker dies with it, mid-job or not);
  SIGKILL of the SeaweedFS child under the running service (the service must bring it back);
  SIGKILL of a collector process after a seeded delay. Wall clock: TTLs, grace and leases are
  seconds (``WEIGHTSTORE_TTL_MIN_SECONDS=2``, grace 2 s, worker lease 4 s, collector lease 3 s).
  Ends with a collection past grace and ``weightstore gc verify`` exiting 0.

**Actors.** 3 tenants x 2 trainer clients (the real ``weightstore.client.Client`` plus a raw httpx
client on the same key), each with its own run; an admin; a reader of a tenant that stores nothing.

**Operations** (one per client per round, drawn from ``random.Random(seed)``): save (sampler or
training; weights either shared by every tenant or private to one; presigned or streamed; TTL none,
short or long), load (download and compare bytes), delete, TTL change, export job (PEFT of a tiny
Llama adapter), and probes. About one round in ten is a *burst*: every client saves the same new
bytes with presigned transfers at once.

**Invariants** (a violation names the seed, the step and the invariant; ``[issue 11 item N]`` when
it is one of the issue's found classes):

- ``acknowledged_readable``: every acknowledged commit downloads byte-identical (manifest and bytes)
  until it is deleted or expires; ``deleted_stays_deleted``: afterwards it answers ``not_found``;
  ``unacknowledged_is_whole``: a save that got no answer (killed server) is absent or whole;
- ``gc_verify_clean``: ``verify`` has no error finding after every step (every referenced blob live,
  present, right size, sampled hashes right; ledger consistent), none at all at the end;
  ``collector_finishes``: no collector run stops fail-closed (referenced data missing);
- ``no_5xx_for_permanent``: every 5xx the service sends is a 503 with ``Retry-After`` and a
  transient code; ``no_dropped_connection``: no connection drops while nothing is killed;
- ``valid_save_succeeds`` / ``valid_request_succeeds``: a valid request fails only transiently;
- ``foreign_vs_missing``: another tenant's checkpoint (GET, files, TTL, DELETE), run (GET, create with
  that id), bytes (declare by hash and commit without sending) and base-model usage answer exactly as
  a missing one does, request ids and the ids themselves blanked;
- ``export_succeeds`` / ``export_terminates``: a job whose source stays readable succeeds, every job ends;
- ``restart_after_kill``: ``serve`` comes back ready after SIGKILL; ``store_restarted``: ``/readyz``
  is ready again within 30 s after the store is killed.

**Replay.** The seed is printed at the start (``-s``) and in every failure message:
``WEIGHTSTORE_RELIABILITY_SEED=<seed> pytest tests/reliability -k <scenario>`` draws the same
schedule and operations (the interleaving inside a round is the threads' and the OS's).
``WEIGHTSTORE_RELIABILITY_KEEP_GOING=1`` records every violation and fails once at the end instead
of at the first failing step.
"""
