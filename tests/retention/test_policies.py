"""Retention policies and pins applied by the collector's expire phase (issue 12, part 3).

Every scenario saves checkpoints through the real upload path, runs the collector dry first (the
plan names exactly the ids a policy expires and nothing changes), then for real (exactly those
expire through the TTL path: state ``expired``, ledger ``end`` at that instant, restorable), and
ends with ``verify()``. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from tests.collector._util import assert_verified, download, new_run, principal, save
from tests.helpers import sampler_files, state_files
from weightstore import checkpoints, policies
from weightstore.auth import Principal
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import InvalidRequest, NotFound
from weightstore.models import Checkpoint, UsageEvent
from weightstore.names import TinkerPath
from weightstore.retention import restore_checkpoint
from weightstore_gc import run

HOUR = 3600


def _save_series(  # type: ignore[no-untyped-def]
    ctx: Context, clock, p: Principal, run_id: str, n: int, *, kind: str = "sampler", prefix: str = "s"
) -> list[str]:
    """``n`` checkpoints one second apart (creation order = name order); returns their tinker paths."""
    paths = []
    for i in range(1, n + 1):
        files = sampler_files(i) if kind == "sampler" else state_files(i)
        paths.append(save(ctx, p, run_id, f"{prefix}{i:03d}", files, kind=kind))
        clock.advance(1)
    return paths


def _ids(ctx: Context, run_id: str) -> dict[str, str]:
    with session_scope(ctx.engine) as s:
        return {c.name: c.id for c in s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id)).all()}


def _states(ctx: Context, run_id: str) -> dict[str, str]:
    with session_scope(ctx.engine) as s:
        return {c.name: c.state for c in s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id)).all()}


def _ends(ctx: Context, ids: list[str]) -> dict[str, datetime]:
    with session_scope(ctx.engine) as s:
        rows = s.exec(select(UsageEvent).where(col(UsageEvent.checkpoint_id).in_(ids), UsageEvent.event == "end")).all()
        return {r.checkpoint_id: r.at for r in rows}


def _planned(rep) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {e["checkpoint_id"]: e["policy"] for e in rep.plan["expire"]["policy_expire"]}


def _dry_then_real(ctx: Context, run_id: str, expected_names: set[str]):  # type: ignore[no-untyped-def]
    """Dry run: the plan lists exactly ``expected_names`` and changes nothing. Real run: exactly
    those expire, each with one ledger ``end`` at the run's instant. Returns the real report."""
    ids = _ids(ctx, run_id)
    expected = {ids[n] for n in expected_names}
    before = _states(ctx, run_id)
    dry = run(ctx, dry_run=True)
    assert set(_planned(dry)) == expected
    assert dry.plan["expire"]["policy_expire_checkpoints"] == len(expected)
    assert _states(ctx, run_id) == before
    assert _ends(ctx, list(expected)) == {}
    now = ctx.clock.now()
    rep = run(ctx)
    assert rep.state == "finished"
    assert set(_planned(rep)) == expected
    assert rep.stats["expire"]["expired_by_policy"] == len(expected)
    after = _states(ctx, run_id)
    assert {n for n, st in after.items() if st != before[n]} == expected_names
    assert {after[n] for n in expected_names} <= {"expired"}
    still = {n for n, st in before.items() if st == "committed"} - expected_names
    assert {n for n, st in after.items() if st == "committed"} == still
    assert _ends(ctx, list(expected)) == {i: now for i in expected}
    return rep


def test_keep_last_n_keeps_the_newest_per_kind(ctx, keys, clock):
    """issue 12, part 3: keep-last-N per kind, exact survivors; dry run first."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    _save_series(ctx, clock, p, run_id, 5)
    _save_series(ctx, clock, p, run_id, 2, kind="training", prefix="t")
    with session_scope(ctx.engine) as s:
        policies.set_run_policy(s, p, run_id, keep_last=2, keep_every=None, now=clock.now())
    rep = _dry_then_real(ctx, run_id, {"s001", "s002", "s003"})
    assert rep.plan["expire"]["policy_expire_bytes"] == sum(len(b) for i in (1, 2, 3) for b in sampler_files(i).values())
    with pytest.raises(NotFound):
        download(ctx, p, str(TinkerPath(run_id, "sampler", "s001")))
    assert download(ctx, p, str(TinkerPath(run_id, "sampler", "s005"))) == sampler_files(5)
    assert run(ctx).stats["expire"]["expired_by_policy"] == 0  # stable: nothing more the next run
    assert_verified(ctx)


def test_keep_every_k_is_stable_across_runs(ctx, keys, clock):
    """issue 12, part 3: keep-every-K by creation order in (run, kind), counted over every checkpoint
    ever committed there, so expiries do not shift it; the newest is always kept."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    _save_series(ctx, clock, p, run_id, 7)
    with session_scope(ctx.engine) as s:
        policies.set_run_policy(s, p, run_id, keep_last=None, keep_every=3, now=clock.now())
    _dry_then_real(ctx, run_id, {"s001", "s002", "s004", "s005"})  # keeps #3, #6 and the newest (#7)
    _save_series(ctx, clock, p, run_id, 2, prefix="u")  # #8, #9
    _dry_then_real(ctx, run_id, {"s007", "u001"})  # #9 is a multiple and the newest; #3, #6 stay
    assert {n for n, st in _states(ctx, run_id).items() if st == "committed"} == {"s003", "s006", "u002"}
    assert_verified(ctx)


def test_keep_last_and_every_combined_and_the_reason_is_shown(ctx, keys, clock):
    """issue 12, part 3: a checkpoint is kept when any rule keeps it; the plan says which rule."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    _save_series(ctx, clock, p, run_id, 6)
    with session_scope(ctx.engine) as s:
        policies.set_run_policy(s, p, run_id, keep_last=2, keep_every=2, now=clock.now())
    rep = _dry_then_real(ctx, run_id, {"s001", "s003"})
    rules = {e["tinker_path"]: e["rule"] for e in rep.plan["expire"]["policy_expire"]}
    why = "keep_last=2: 4th newest sampler; keep_every=2: #3 is not a multiple"
    assert rules[str(TinkerPath(run_id, "sampler", "s003"))] == why
    assert_verified(ctx)


def test_pinned_survives_policy_and_ttl_and_unpin_makes_it_eligible(ctx, keys, clock):
    """issue 12, part 3: pinned is never expired by policy or TTL; unpinning makes it eligible."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    ttl_path = save(ctx, p, run_id, "ttl", sampler_files(9), ttl=HOUR)
    clock.advance(1)
    _save_series(ctx, clock, p, run_id, 3)
    with session_scope(ctx.engine) as s:
        pinned = policies.pin(s, p, TinkerPath.parse(ttl_path), now=clock.now())
        assert pinned.pinned and pinned.expires_at is None
        policies.pin(s, p, TinkerPath(run_id, "sampler", "s001"), now=clock.now())
        policies.set_run_policy(s, p, run_id, keep_last=1, keep_every=None, now=clock.now())
    with session_scope(ctx.engine) as s, pytest.raises(InvalidRequest, match="pinned"):
        checkpoints.set_ttl(s, p, TinkerPath.parse(ttl_path), 2 * HOUR, settings=ctx.settings, now=clock.now())
    clock.advance(HOUR + 1)  # past the TTL it had before the pin
    _dry_then_real(ctx, run_id, {"s002"})  # "ttl" and s001 pinned, s003 the newest
    assert download(ctx, p, ttl_path) == sampler_files(9)
    with session_scope(ctx.engine) as s:
        policies.unpin(s, p, TinkerPath(run_id, "sampler", "s001"), settings=ctx.settings, now=clock.now())
        policies.unpin(s, p, TinkerPath.parse(ttl_path), settings=ctx.settings, now=clock.now(), ttl_seconds=HOUR)
    _dry_then_real(ctx, run_id, {"ttl", "s001"})  # both eligible by policy again
    assert_verified(ctx)


def test_pinned_checkpoint_is_not_expired_by_ttl_without_policy(ctx, keys, clock):
    """issue 12, part 3: TTL expiry (expire_due) never touches a pinned checkpoint, even one whose
    expires_at has passed (pinning clears it; this checks the collector's own guard too)."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    path = save(ctx, p, run_id, "a", sampler_files(1), ttl=HOUR)
    with session_scope(ctx.engine) as s:  # a pinned row that still carries an expires_at
        s.execute(sa.update(Checkpoint).where(col(Checkpoint.run_id) == run_id).values(pinned=True))
    clock.advance(HOUR + 1)
    rep = run(ctx)
    assert rep.plan["expire"]["expire_checkpoints"] == 0 and rep.stats["expire"]["expired"] == 0
    assert _states(ctx, run_id) == {"a": "committed"}
    assert download(ctx, p, path) == sampler_files(1)  # still visible
    assert_verified(ctx)


def test_tenant_default_and_run_override_precedence(ctx, keys, clock):
    """issue 12, part 3: the tenant default applies to runs without a policy; a run's own policy
    replaces it as a whole (neither rule = keep everything); clearing it restores the default."""
    p = principal(ctx, keys.trainer)
    plain, override, optout = new_run(ctx, p), new_run(ctx, p), new_run(ctx, p)
    for r in (plain, override, optout):
        _save_series(ctx, clock, p, r, 4)
    other = principal(ctx, keys.other_trainer)
    foreign = new_run(ctx, other)
    _save_series(ctx, clock, other, foreign, 3)
    with session_scope(ctx.engine) as s:
        policies.set_tenant_policy(s, p, "acme", keep_last=1, keep_every=None, now=clock.now())
        policies.set_run_policy(s, p, override, keep_last=3, keep_every=None, now=clock.now())
        policies.set_run_policy(s, p, optout, keep_last=None, keep_every=None, now=clock.now())
        eff = policies.effective_for_runs(s, [plain, override, optout, foreign])
    assert (eff[plain].scope, eff[plain].keep_last) == ("tenant", 1)  # type: ignore[union-attr]
    assert (eff[override].scope, eff[override].keep_last) == ("run", 3)  # type: ignore[union-attr]
    assert eff[optout].rule == "keep all" and eff[foreign] is None  # type: ignore[union-attr]
    ids = {**_ids(ctx, plain)}
    dry = run(ctx, dry_run=True)
    o = _ids(ctx, override)
    assert set(_planned(dry)) == {ids["s001"], ids["s002"], ids["s003"], o["s001"]}
    assert _planned(dry)[o["s001"]] == "run" and _planned(dry)[ids["s001"]] == "tenant"
    rep = run(ctx)
    assert rep.stats["expire"]["expired_by_policy"] == 4
    assert {n for n, st in _states(ctx, optout).items() if st == "committed"} == {"s001", "s002", "s003", "s004"}
    assert set(_states(ctx, foreign).values()) == {"committed"}
    with session_scope(ctx.engine) as s:
        now_applies = policies.clear_run_policy(s, p, override, now=clock.now())
    assert now_applies is not None and now_applies.scope == "tenant"
    _dry_then_real(ctx, override, {"s002", "s003"})
    assert_verified(ctx)


def test_policy_expiry_is_restorable_and_released_after_grace(ctx, keys, clock):
    """issue 12, part 3: a policy expiry is the TTL path: restorable in the trash window, released
    one grace period after the instant it expired."""
    p = principal(ctx, keys.trainer)
    admin = principal(ctx, keys.admin)
    run_id = new_run(ctx, p)
    _save_series(ctx, clock, p, run_id, 3)
    with session_scope(ctx.engine) as s:
        policies.set_run_policy(s, p, run_id, keep_last=1, keep_every=None, now=clock.now())
    _dry_then_real(ctx, run_id, {"s001", "s002"})
    ids = _ids(ctx, run_id)
    with session_scope(ctx.engine) as s:  # restored with a TTL past the grace: the policy takes it again next run
        restore_checkpoint(s, admin, ids["s001"], settings=ctx.settings, now=clock.now(), ttl_seconds=None)
    assert download(ctx, p, str(TinkerPath(run_id, "sampler", "s001"))) == sampler_files(1)
    clock.advance(ctx.settings.gc_grace_seconds + 1)
    rep = run(ctx)
    assert rep.stats["expire"]["released"] == 1  # s002
    assert rep.stats["expire"]["expired_by_policy"] == 1  # s001 again
    assert _states(ctx, run_id) == {"s001": "expired", "s002": "deleted", "s003": "committed"}
    assert_verified(ctx, collected=True)


def test_policy_arguments_are_validated_and_owned(ctx, keys, clock):
    """issue 12, part 3: rules are 1..1e6; only the run's tenant (or an admin) sets its policy; a
    tenant default only by that tenant's trainer or an admin; readers cannot set."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    with session_scope(ctx.engine) as s, pytest.raises(InvalidRequest):
        policies.set_run_policy(s, p, run_id, keep_last=0, keep_every=None, now=clock.now())
    with session_scope(ctx.engine) as s, pytest.raises(NotFound):
        policies.set_run_policy(s, principal(ctx, keys.other_trainer), run_id, keep_last=1, keep_every=None, now=clock.now())
    with session_scope(ctx.engine) as s, pytest.raises(NotFound):
        policies.set_tenant_policy(s, principal(ctx, keys.other_trainer), "acme", keep_last=1, keep_every=None, now=clock.now())
    with session_scope(ctx.engine) as s:
        policies.set_tenant_policy(s, principal(ctx, keys.admin), "acme", keep_last=4, keep_every=None, now=clock.now())
        policies.set_tenant_policy(s, p, "acme", keep_last=5, keep_every=None, now=clock.now())  # update, not a second row
    with session_scope(ctx.engine) as s:
        rows = policies.list_policies(s, p)
    assert [(r.scope, r.keep_last) for r in rows] == [("tenant", 5)]
