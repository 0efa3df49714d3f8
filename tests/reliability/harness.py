"""The reliability harness itself: tenants and clients, the model of what was acknowledged, the
seeded operation generator, the invariants, and the round loop both scenarios share.

A run is a sequence of *rounds*. Before a round the main thread draws, from ``random.Random(seed)``,
one operation per client (3 tenants x 2 clients) and at most one *global* operation (a clock jump, a
collector run, a process kill: what a scenario offers). The client operations then run at the same
time on their own threads, the global one beside them; afterwards the checker compares the service
with the model. What each client operates on is its own checkpoints (so the model's outcome does not
depend on the interleaving); reads and probes cross tenants.

See ``tests/reliability/__init__.py`` for the list of operations, invariants and faults.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from tests.exportjobs.builders import adapter_files
from tests.helpers import state_files
from weightstore.client import Client
from weightstore.errors import NotFound, TransientError, WeightstoreError, error_for_code

SEED_ENV = "WEIGHTSTORE_RELIABILITY_SEED"
KEEP_GOING_ENV = "WEIGHTSTORE_RELIABILITY_KEEP_GOING"
"""``1``: record every violation and fail once at the end (to list them all); default: stop at the first step."""
BASE = "tiny-llama"
UNUSED_BASE = "tiny-llama-unused"
"""The same bytes registered under a second name no checkpoint uses: the "missing" side of the usage probe."""
TENANTS = ("rel-a", "rel-b", "rel-c")
CLIENTS_PER_TENANT = 2
SHARED_SEEDS = (1, 2, 3)
"""Adapter weights every tenant saves (identical bytes across tenants: dedup and the presigned race)."""
ISSUE_ITEMS = {
    "foreign_vs_missing": "issue 11 item 1 (side channels)",
    "restart_after_kill": "issue 11 item 2 (restart after a crash)",
    "store_restarted": "issue 11 item 2 (nothing restarts the store)",
    "valid_save_succeeds": "issue 11 item 3 (identical bytes saved at the same time)",
    "no_5xx_for_permanent": "issue 11 item 4 (5xx on bad input)",
}


def seed_from_env() -> int:
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw else random.SystemRandom().randrange(2**31)


@dataclass
class Ckpt:
    """One acknowledged commit: what must read back, byte-identical, until it is deleted or expires."""

    path: str
    tenant: str
    kind: str
    files: dict[str, bytes] | None
    """The bytes sent; None for an export's output (then ``shas`` as first read is what must stay)."""
    shas: dict[str, str]
    expires_at: datetime | None
    owner: int | None
    """Index of the actor that may delete it or change its TTL (None: nobody, e.g. an export output)."""
    step: int
    deleted: bool = False


@dataclass
class Job:
    job_id: str
    tenant: str
    source: str
    step: int
    state: str = "queued"
    result: str | None = None


@dataclass
class Actor:
    """One client of one tenant: the real Python client, a raw httpx client on the same key, its run."""

    index: int
    tenant: str
    key: str
    client: Client
    raw: httpx.Client
    run_id: str = ""


@dataclass(frozen=True)
class Violation:
    step: int
    invariant: str
    detail: str

    def line(self) -> str:
        hint = f" [{ISSUE_ITEMS[self.invariant]}]" if self.invariant in ISSUE_ITEMS else ""
        return f"step {self.step}: invariant {self.invariant}{hint}: {self.detail}"


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Harness:
    """Model, actors and checker over one running service at ``base_url``.

    ``now`` is the service's clock as the test sees it (a ``FakeClock`` in-process, the wall clock
    for subprocesses); ``margin`` seconds around an expiry are not judged (wall-clock scenarios only).
    """

    def __init__(
        self, *, seed: int, base_url: str, admin_key: str, now: Callable[[], datetime], margin: float = 0.0, label: str = ""
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.base_url = base_url
        self.now = now
        self.margin = margin
        self.label = label
        self.step = 0
        self.keep_going = os.environ.get(KEEP_GOING_ENV) == "1"
        self.violations: list[Violation] = []
        self._lock = threading.Lock()
        self.model: dict[str, Ckpt] = {}
        self.unknown: dict[str, dict[str, bytes]] = {}
        """Saves whose outcome was not acknowledged (transient error, killed server): absent or identical."""
        self.jobs: list[Job] = []
        self.fault_active = threading.Event()
        """Set while a scenario has a process down: dropped connections are expected then, not a defect."""
        self.transients = 0
        self.admin = self._http(admin_key)
        self.actors: list[Actor] = []
        self.readers: dict[str, httpx.Client] = {}
        self._config_bytes = adapter_files(1)["adapter_config.json"]
        self._optimizers = [state_files(s)["optimizer.safetensors"] for s in (0, 1)]
        self._weights_cache: dict[int, bytes] = {}
        self._run_ids_tried: set[tuple[str, str]] = set()
        self.sent: dict[str, set[str]] = {}
        """sha256s each tenant ever tried to save: the dedup probe only asks about bytes a tenant never sent."""

    # --- plumbing -------------------------------------------------------------------------------
    def _on_response(self, response: httpx.Response) -> None:
        """Every answer the service gives goes through here: a 5xx must be a transient 503."""
        if response.status_code < 500:
            return
        response.read()
        try:
            body = response.json()
        except ValueError:
            body = {}
        code = body.get("code") if isinstance(body, dict) else None
        transient = (
            response.status_code == 503
            and "retry-after" in response.headers
            and code is not None
            and issubclass(error_for_code(code), TransientError)
        )
        if transient:
            with self._lock:
                self.transients += 1
            return
        self.violate(
            "no_5xx_for_permanent",
            f"{response.request.method} {response.request.url.path} answered {response.status_code} "
            f"{response.text[:300]!r} (a 5xx must be a transient 503 with Retry-After)",
        )

    def _http(self, key: str) -> httpx.Client:
        # Raw probes open a fresh connection each time: a reused keep-alive connection that the server
        # closes at that instant is a client-side race (the product client re-sends idempotent calls).
        return httpx.Client(
            base_url=self.base_url,
            headers={"X-API-Key": key},
            timeout=60,
            event_hooks={"response": [self._on_response]},
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def _client(self, key: str, transfer: str = "auto") -> Client:
        # retry_deadline=0: one attempt per replica, so the harness sees every fault it injects
        c = Client(self.base_url, key, timeout=60, transfer=transfer, hash_cache=False, parallel=2, retry_deadline=0)
        c.http.event_hooks["response"].append(self._on_response)
        return c

    def retarget(self, base_url: str) -> None:
        """Point every client at a new URL (a restarted ``serve`` on another port)."""
        self.base_url = base_url
        for a in self.actors:
            a.client.http.base_url = httpx.URL(base_url)
            a.client.base_urls = [base_url]
            a.raw.base_url = httpx.URL(base_url)
        self.admin.base_url = httpx.URL(base_url)
        for r in self.readers.values():
            r.base_url = httpx.URL(base_url)

    def violate(self, invariant: str, detail: str) -> None:
        with self._lock:
            self.violations.append(Violation(self.step, invariant, detail))

    def failure_message(self, violations: list[Violation] | None = None) -> str:
        rows = violations if violations is not None else self.violations
        lines = "\n  ".join(v.line() for v in rows)
        return (
            f"reliability harness {self.label} seed={self.seed}: {len(rows)} invariant violation(s)\n  {lines}\n"
            f"replay: {SEED_ENV}={self.seed} pytest tests/reliability -k '{self.label}'"
        )

    def end_step(self) -> None:
        """Raise now if this step broke an invariant (unless asked to keep going)."""
        if self.violations and not self.keep_going:
            raise AssertionError(self.failure_message())

    def finish(self) -> None:
        if self.violations:
            raise AssertionError(self.failure_message())

    def close(self) -> None:
        for a in self.actors:
            a.client.close()
            a.raw.close()
        for r in self.readers.values():
            r.close()
        self.admin.close()

    # --- setup ----------------------------------------------------------------------------------
    def create_key(self, tenant: str, role: str) -> str:
        r = self.admin.post("/v1/keys", json={"tenant": tenant, "role": role, "create_tenant": True})
        assert r.status_code == 201, r.text
        return str(r.json()["api_key"])

    def setup_tenants(self) -> None:
        for tenant in TENANTS:
            for _ in range(CLIENTS_PER_TENANT):
                key = self.create_key(tenant, "trainer")
                actor = Actor(len(self.actors), tenant, key, self._client(key), self._http(key))
                actor.run_id = actor.client.create_run(BASE, lora_rank=4)["run_id"]
                self.actors.append(actor)
        # A tenant that stores nothing: the usage probe's reader.
        self.readers["probe"] = self._http(self.create_key("rel-probe", "reader"))

    # --- bytes ----------------------------------------------------------------------------------
    def weights(self, seed: int) -> bytes:
        if seed not in self._weights_cache:
            self._weights_cache[seed] = adapter_files(seed)["adapter_model.safetensors"]
        return self._weights_cache[seed]

    def private_seed(self, actor: Actor) -> int:
        """Weights no other tenant ever sends: the probe's "some other tenant stored this" bytes."""
        return 10_000 + TENANTS.index(actor.tenant) * 1000 + self.rng.randrange(1000)

    # --- the model ------------------------------------------------------------------------------
    def _expired(self, c: Ckpt, now: datetime, margin: float) -> bool:
        return c.expires_at is not None and (c.expires_at - now).total_seconds() <= margin

    def readable(self, c: Ckpt, now: datetime | None = None) -> bool:
        """Must read back: not deleted, not expired (with the margin on the safe side)."""
        now = now or self.now()
        return not c.deleted and not self._expired(c, now, self.margin)

    def gone(self, c: Ckpt, now: datetime | None = None) -> bool:
        """Must answer not_found: deleted, or expired for longer than the margin."""
        now = now or self.now()
        return c.deleted or self._expired(c, now, -self.margin)

    def snapshot(self) -> list[Ckpt]:
        with self._lock:
            return list(self.model.values())

    def own(self, actor: Actor, *, kind: str | None = None) -> list[Ckpt]:
        now = self.now()
        return [
            c for c in self.snapshot() if c.owner == actor.index and self.readable(c, now) and (kind is None or c.kind == kind)
        ]

    def foreign(self, actor: Actor) -> list[Ckpt]:
        return [c for c in self.snapshot() if c.tenant != actor.tenant]

    # --- operations -----------------------------------------------------------------------------
    def draw_ops(self, burst: bool) -> list[tuple[Actor, str, dict[str, Any]]]:
        """One operation per actor, drawn in a fixed order from the seeded generator."""
        ops: list[tuple[Actor, str, dict[str, Any]]] = []
        fresh = 5000 + self.step  # a burst: every client saves the same new bytes, presigned
        for a in self.actors:
            if burst:
                ops.append((a, "save", {"seed": fresh, "kind": "sampler", "transfer": "presigned", "ttl": None}))
                continue
            op = self.rng.choices(
                ["save", "load", "delete", "ttl", "probe_ckpt", "probe_run", "probe_dedup", "probe_usage", "export"],
                weights=[30, 14, 8, 8, 8, 4, 5, 3, 4],
            )[0]
            args: dict[str, Any] = {}
            if op == "save":
                seed = self.rng.choice(SHARED_SEEDS) if self.rng.random() < 0.6 else self.private_seed(a)
                args = {
                    "seed": seed,
                    "kind": self.rng.choice(["sampler", "sampler", "training"]),
                    "transfer": self.rng.choice(["presigned", "stream"]),
                    "ttl": self.rng.choice(self.ttl_choices),
                }
            elif op in ("load", "delete", "ttl", "export"):
                mine = sorted(self.own(a, kind="sampler" if op == "export" else None), key=lambda c: c.path)
                if not mine:
                    op, args = "probe_ckpt", {}
                else:
                    args = {"target": self.rng.choice(mine).path, "ttl": self.rng.choice(self.ttl_choices)}
            if op.startswith("probe"):
                args["salt"] = self.rng.randrange(2**32)
                args["pick"] = self.rng.random()
            ops.append((a, op, args))
        return ops

    ttl_choices: list[int | None] = [None, 3600, 7200, 86_400]

    def run_op(self, actor: Actor, op: str, args: dict[str, Any]) -> None:
        """Run one operation and judge its outcome; never raises."""
        try:
            getattr(self, f"op_{op}")(actor, **args)
        except TransientError:
            with self._lock:
                self.transients += 1
        except httpx.TransportError as exc:
            if not self.fault_active.is_set():
                self.violate("no_dropped_connection", f"{op} {args}: connection dropped with no fault injected: {exc!r}")
        except Exception as exc:  # noqa: BLE001 - every unexpected outcome is a finding, reported with its op
            self.violate(
                "valid_request_succeeds", f"{actor.tenant}#{actor.index} {op} {args}: {exc!r}\n{traceback.format_exc(limit=3)}"
            )

    def op_save(self, a: Actor, *, seed: int, kind: str, transfer: str, ttl: int | None) -> None:
        files: dict[str, bytes] = {"adapter_model.safetensors": self.weights(seed), "adapter_config.json": self._config_bytes}
        if kind == "training":
            files["optimizer.safetensors"] = self._optimizers[seed % 2]
        with self._lock:
            self.sent.setdefault(a.tenant, set()).update(_sha(b) for b in files.values())
        name = f"s{self.step}-{a.index}"
        path_guess = f"{a.run_id}/{kind}/{name}"
        self.unknown[path_guess] = files
        try:
            ans = a.client.upload(a.run_id, kind, name, files, ttl_seconds=ttl, transfer=transfer)
        except WeightstoreError as exc:
            if isinstance(exc, TransientError):
                raise
            self.violate(
                "valid_save_succeeds",
                f"{a.tenant}#{a.index} save {name} ({kind}, {transfer}, weights seed {seed}) failed: [{exc.code}] {exc.message}",
            )
            return
        path = str(ans["tinker_path"])
        del self.unknown[path_guess]
        with self._lock:
            self.model[path] = Ckpt(
                path,
                a.tenant,
                kind,
                files,
                {p: _sha(b) for p, b in files.items()},
                parse_time(ans["checkpoint"]["expires_at"]),
                a.index,
                self.step,
            )

    def op_load(self, a: Actor, *, target: str, ttl: int | None) -> None:
        c = self.model[target]
        if c.kind == "training":
            weights, opt = a.client.load_state(target)
            assert opt is not None
        self.check_bytes(a, c, "load")

    def op_delete(self, a: Actor, *, target: str, ttl: int | None) -> None:
        try:
            a.client.delete(target)
        except NotFound:
            if self.readable(self.model[target]):
                self.violate("acknowledged_readable", f"delete of own {target}: not_found while it should exist")
            return
        self.model[target].deleted = True

    def op_ttl(self, a: Actor, *, target: str, ttl: int | None) -> None:
        c = self.model[target]
        try:
            row = a.client.set_ttl(target, ttl)
        except NotFound:
            if self.readable(c):
                self.violate("acknowledged_readable", f"ttl of own {target}: not_found while it should exist")
            return
        c.expires_at = parse_time(row["expires_at"])

    def op_export(self, a: Actor, *, target: str, ttl: int | None) -> None:
        r = a.raw.post("/v1/exports", json={"source": target, "target": "peft"})
        if r.status_code == 503:
            raise TransientError(r.text)
        if r.status_code != 202:
            if self.readable(self.model[target]):
                self.violate("valid_request_succeeds", f"export of {target}: {r.status_code} {r.text[:300]}")
            return
        with self._lock:
            self.jobs.append(Job(r.json()["job_id"], a.tenant, target, self.step))

    # --- probes: "foreign" and "missing" must answer alike --------------------------------------
    @staticmethod
    def _norm(r: httpx.Response, secrets: list[str], keep: tuple[str, ...] = ()) -> tuple[int, str, str]:
        """(status, code, body without request id and with ``secrets`` blanked); a success keeps
        only the fields named in ``keep`` (timestamps and ids of two new things always differ)."""
        try:
            body = r.json()
        except ValueError:
            return r.status_code, "", r.text
        if not isinstance(body, dict):
            return r.status_code, "", json.dumps(body)
        body.pop("request_id", None)
        if r.is_success:
            body = {k: body.get(k) for k in keep}
        text = json.dumps({k: v for k, v in body.items() if k not in ("code",)}, sort_keys=True)
        for s in sorted(secrets, key=len, reverse=True):
            text = text.replace(s, "<id>")
        return r.status_code, str(body.get("code", "")), text

    def _compare(
        self, what: str, foreign: httpx.Response, missing: httpx.Response, secrets: list[str], keep: tuple[str, ...] = ()
    ) -> None:
        if foreign.status_code == 503 or missing.status_code == 503:
            raise TransientError(f"{what}: 503")
        f, m = self._norm(foreign, secrets, keep), self._norm(missing, secrets, keep)
        if f != m:
            self.violate("foreign_vs_missing", f"{what}: foreign answers {f}, missing answers {m}")

    def _missing_like(self, run_id: str, salt: int) -> str:
        r = random.Random(salt)
        if ":train:" in run_id:
            return f"{uuid.UUID(int=r.getrandbits(128), version=4)}:train:0"
        return "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in run_id)

    def op_probe_ckpt(self, a: Actor, *, salt: int, pick: float) -> None:
        others = sorted(self.foreign(a), key=lambda c: c.path)
        if not others:
            return
        c = others[int(pick * len(others))]
        run_id, segment, name = c.path.removeprefix("tinker://").split("/")
        missing_run = self._missing_like(run_id, salt)
        missing_name = f"s{salt % 1000}-{salt % 7}"
        secrets = [run_id, name, missing_run, missing_name, c.path, f"tinker://{missing_run}/{segment}/{missing_name}"]
        f_url, m_url = f"/v1/checkpoints/{run_id}/{segment}/{name}", f"/v1/checkpoints/{missing_run}/{segment}/{missing_name}"
        for method, suffix, body in (("GET", "", None), ("GET", "/files", None), ("PUT", "/ttl", {"ttl_seconds": 3600})):
            f = a.raw.request(method, f_url + suffix, json=body)
            m = a.raw.request(method, m_url + suffix, json=body)
            self._compare(f"{method} checkpoint{suffix}", f, m, secrets)
        # a foreign DELETE must change nothing (the checker then reads the checkpoint back)
        self._compare("DELETE checkpoint", a.raw.delete(f_url), a.raw.delete(m_url), secrets)

    def op_probe_run(self, a: Actor, *, salt: int, pick: float) -> None:
        others = sorted({x.path.removeprefix("tinker://").split("/")[0] for x in self.foreign(a)})
        others = others or sorted({b.run_id for b in self.actors if b.tenant != a.tenant})
        run_id = others[int(pick * len(others))]
        missing = self._missing_like(run_id, salt)
        secrets = [run_id, missing]
        self._compare("GET run", a.raw.get(f"/v1/runs/{run_id}"), a.raw.get(f"/v1/runs/{missing}"), secrets)
        with self._lock:  # creating "that id" is a write: only the first try per tenant compares like with like
            if (a.tenant, run_id) in self._run_ids_tried:
                return
            self._run_ids_tried.add((a.tenant, run_id))
        body = {"base_model": BASE, "lora_rank": 4}
        f = a.raw.post("/v1/runs", json={**body, "run_id": run_id})
        m = a.raw.post("/v1/runs", json={**body, "run_id": missing})
        self._compare("POST run with that id", f, m, secrets + [self._missing_like(run_id, salt + 1)])

    def op_probe_dedup(self, a: Actor, *, salt: int, pick: float) -> None:
        """Declare a file by hash only (presigned), send nothing, commit: the answer must not depend
        on whether another tenant stores those bytes."""
        with self._lock:
            mine = set(self.sent.get(a.tenant, ()))
        theirs = sorted(
            {
                (_sha(c.files["adapter_model.safetensors"]), len(c.files["adapter_model.safetensors"]))
                for c in self.foreign(a)
                if c.files and _sha(c.files["adapter_model.safetensors"]) not in mine
            }
        )
        if not theirs:
            return
        sha, size = theirs[int(pick * len(theirs))]
        unknown_sha = hashlib.sha256(f"never-stored-{salt}".encode()).hexdigest()
        # Every other file of the probe is bytes nobody ever stored, so both answers can differ only
        # in the probed file. With the shared config (CI seed 305092938) this tenant's own possession
        # of it changed between the two declares (a save of it committed, or the collector reclaimed
        # it), and the answers differed in adapter_config.json alone: not an oracle.
        cfg = json.dumps({**json.loads(self._config_bytes), "probe": f"{self.step}-{a.index}-{salt}"}).encode()
        answers = []
        for i, digest in enumerate((sha, unknown_sha)):
            name = f"p{self.step}-{a.index}-{i}"
            declare = a.raw.post(
                "/v1/uploads",
                json={
                    "run_id": a.run_id,
                    "kind": "sampler",
                    "name": name,
                    "transfer": "presigned",
                    "files": [
                        {"path": "adapter_model.safetensors", "size_bytes": size, "sha256": digest},
                        {"path": "adapter_config.json", "size_bytes": len(cfg), "sha256": _sha(cfg)},
                    ],
                },
            )
            if declare.status_code != 201:
                answers.append((declare, declare, name, ""))
                continue
            upload_id = declare.json()["upload_id"]
            commit = a.raw.post(f"/v1/uploads/{upload_id}/commit")
            a.raw.delete(f"/v1/uploads/{upload_id}")
            answers.append((declare, commit, name, upload_id))
        secrets = [sha, unknown_sha] + [x[2] for x in answers] + [x[3] for x in answers if x[3]]
        (fd, fc, *_), (md, mc, *_) = answers
        with self._lock:
            sent_meanwhile = sha in self.sent.get(a.tenant, ())
        if sent_meanwhile:
            # Another actor of this tenant saved these bytes during the probe (CI seed 1249045743:
            # a presigned save of the same weights in the same step; CI seed 472445177: such a save
            # committed first, so the declare answered `present`). Its PUT proves this tenant
            # holds them, so `present` or a 200 is the product's rule (uploads.py, "another upload of this
            # tenant"), not an oracle: the comparison says nothing this time.
            return
        if fd.status_code == 201 and md.status_code == 201:
            ft = [f["transfer"] for f in fd.json()["files"] if f["path"] == "adapter_model.safetensors"]
            mt = [f["transfer"] for f in md.json()["files"] if f["path"] == "adapter_model.safetensors"]
            if ft != mt:
                self.violate("foreign_vs_missing", f"declare by hash: foreign bytes answer {ft}, unknown bytes {mt}")
        else:
            self._compare("declare by hash", fd, md, secrets)
        if fc.status_code == 200 or mc.status_code == 200:
            self.violate("foreign_vs_missing", f"commit without sending the bytes succeeded ({fc.status_code}, {mc.status_code})")
        self._compare("commit without sending (dedup oracle)", fc, mc, secrets)

    def op_probe_usage(self, a: Actor, *, salt: int, pick: float) -> None:
        """A tenant that uses no base model must see the same about a used one and an unused one."""
        reader = self.readers["probe"]
        f, m = reader.get(f"/v1/base-models/{BASE}"), reader.get(f"/v1/base-models/{UNUSED_BASE}")
        self._compare("GET base model (usage)", f, m, [UNUSED_BASE, BASE], keep=("usage",))

    # --- checks ---------------------------------------------------------------------------------
    def check_bytes(self, a: Actor | None, c: Ckpt, why: str) -> None:
        """``c`` must download byte-identical (through its tenant's own client), or be gone."""
        actor = a or next(x for x in self.actors if x.tenant == c.tenant)
        now = self.now()
        try:
            urls = actor.client.file_urls(c.path)["files"]
        except (TransientError, httpx.TransportError) as exc:
            if self.fault_active.is_set():  # a load racing an injected kill: no answer is the expected outcome
                with self._lock:
                    self.transients += 1
                return
            self.violate("acknowledged_readable", f"{why}: {c.path}: no answer while no fault is injected: {exc!r}")
            return
        except NotFound:
            if not c.deleted and self.readable(c, now) and self.readable(c):
                self.violate("acknowledged_readable", f"{why}: {c.path} (committed at step {c.step}) answers not_found")
            return
        if self.gone(c, now) and self.gone(c):
            self.violate("deleted_stays_deleted", f"{why}: {c.path} was deleted or expired but still answers its files")
            return
        got = {f["path"]: f["sha256"] for f in urls}
        if got != c.shas:
            if c.files is None and not c.shas:
                c.shas = got
            else:
                self.violate("acknowledged_readable", f"{why}: {c.path} manifest changed: {got} != {c.shas}")
                return
        for f in urls:
            try:
                data = self._read_url(actor, f["url"])
            except Exception as exc:  # noqa: BLE001 - a read that keeps failing is the finding
                if self.fault_active.is_set() and isinstance(exc, TransientError | httpx.TransportError | OSError):
                    with self._lock:
                        self.transients += 1  # the store or serve was killed under this read
                    return
                self.violate("acknowledged_readable", f"{why}: {c.path}/{f['path']} cannot be read: {exc!r}")
                return
            if _sha(data) != c.shas[f["path"]] or (c.files is not None and data != c.files[f["path"]]):
                self.violate("acknowledged_readable", f"{why}: {c.path}/{f['path']} bytes differ from what was committed")

    @staticmethod
    def _read_url(actor: Actor, url: str) -> bytes:
        """GET a presigned URL; a store that answers 5xx (just restarted) gets 15 s to recover."""
        deadline = time.monotonic() + 15
        while True:
            try:
                return bytes(actor.client.raw.request("GET", url).data)
            except TransientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def check_round(self, touched: set[str], sample: int) -> None:
        paths = sorted(self.model)
        chosen = set(touched) | set(self.rng.sample(paths, min(sample, len(paths))))
        for p in sorted(chosen):
            if p in self.model:
                self.check_bytes(None, self.model[p], "after step")
        self.poll_jobs()

    def check_all(self, why: str) -> None:
        for p in sorted(self.model):
            self.check_bytes(None, self.model[p], why)
        for guess, files in sorted(self.unknown.items()):
            run_id, kind, name = guess.split("/")
            owner = next(x for x in self.actors if x.run_id == run_id)
            seg = {"sampler": "sampler_weights", "training": "weights"}[kind]
            r = owner.raw.get(f"/v1/checkpoints/{run_id}/{seg}/{name}/files")
            if r.status_code == 200:
                got = {f["path"]: f["sha256"] for f in r.json()["files"]}
                if got != {p: _sha(b) for p, b in files.items()}:
                    self.violate("unacknowledged_is_whole", f"{guess}: an unacknowledged save committed other bytes")
            elif r.status_code != 404:
                self.violate("unacknowledged_is_whole", f"{guess}: {r.status_code} {r.text[:200]}")

    def poll_jobs(self) -> None:
        for job in self.jobs:
            if job.state in ("succeeded", "failed", "cancelled"):
                continue
            owner = next(x for x in self.actors if x.tenant == job.tenant)
            r = owner.raw.get(f"/v1/exports/{job.job_id}")
            if r.status_code != 200:
                continue
            row = r.json()
            job.state = row["state"]
            if job.state == "succeeded":
                job.result = row["result"] or row["output_path"]
                if job.result is None:
                    self.violate("export_output_readable", f"job {job.job_id} succeeded without an output path")
                    continue
                ckpt = owner.raw.get("/v1/checkpoints/" + str(job.result).removeprefix("tinker://"))
                if ckpt.status_code != 200:
                    self.violate("export_output_readable", f"job {job.job_id} succeeded but {job.result}: {ckpt.status_code}")
                    continue
                if job.result not in self.model:
                    self.model[job.result] = Ckpt(
                        job.result, job.tenant, "external", None, {}, parse_time(ckpt.json()["expires_at"]), None, self.step
                    )
            elif job.state == "failed":
                src = self.model.get(job.source)
                if src is not None and self.readable(src):
                    self.violate("export_succeeds", f"job {job.job_id} of {job.source} failed: {row.get('error')}")

    # --- the loop -------------------------------------------------------------------------------
    def run_round(
        self,
        global_op: Callable[[], None] | None,
        *,
        burst: bool = False,
        sample: int = 6,
        settle: Callable[[], None] | None = None,
    ) -> None:
        """Run one round: the actors' operations at the same time (plus ``global_op`` beside
        them), then ``settle`` (bring killed processes back), then the checks of this step."""
        self.step += 1
        ops = self.draw_ops(burst)
        before = {p: (c.deleted, c.expires_at) for p, c in self.model.items()}
        threads = [threading.Thread(target=self.run_op, args=op, daemon=True) for op in ops]
        if global_op is not None:
            threads.append(threading.Thread(target=self._guarded(global_op), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
            if t.is_alive():
                self.violate("bounded", f"an operation of step {self.step} did not finish within 240 s")
        touched = {p for p, c in self.model.items() if before.get(p) != (c.deleted, c.expires_at)}
        touched |= {str(args["target"]) for _, _, args in ops if "target" in args}
        if settle is not None:
            settle()
        self.check_round(touched, sample)

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except AssertionError as exc:
                self.violate("global_op", str(exc))
            except Exception as exc:  # noqa: BLE001 - reported as a finding with the step
                self.violate("global_op", f"{exc!r}\n{traceback.format_exc(limit=4)}")

        return run

    def describe(self) -> str:
        live = sum(1 for c in self.model.values() if self.readable(c))
        return (
            f"{self.label} seed={self.seed}: {self.step} steps, {len(self.model)} acknowledged commits ({live} readable), "
            f"{len(self.unknown)} unacknowledged, {len(self.jobs)} export jobs, {self.transients} transient answers"
        )


@dataclass
class Schedule:
    """Which global operation runs at which step (drawn from the seed up front, printed at start)."""

    steps: dict[int, str] = field(default_factory=dict)

    @classmethod
    def draw(cls, rng: random.Random, rounds: int, counts: dict[str, int]) -> Schedule:
        """``counts[name]`` distinct steps for each global operation (bounded work per run)."""
        picked = rng.sample(range(1, rounds + 1), sum(counts.values()))
        names = [name for name, n in counts.items() for _ in range(n)]
        return cls(dict(sorted(zip(picked, names, strict=True))))
