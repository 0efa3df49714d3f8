"""A benchmark's service: SeaweedFS and ``weightstore serve`` (SQLite) as separate processes, so the
client and the server do not share a GIL, as in production. One start-up for every benchmark that
compares the service with direct S3 access to the same store."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from weightstore.embedded import SeaweedFS, ensure_bucket


@dataclass
class ServeStack:
    url: str
    admin: str
    weed: SeaweedFS
    server: subprocess.Popen[str]
    access: str
    secret: str

    @property
    def endpoint(self) -> str:
        return self.weed.endpoint_url

    def new_key(self, tenant: str) -> str:
        """A trainer key of ``tenant`` (created if missing): dedup is per tenant, so a fresh tenant
        has nothing "present"."""
        headers = {"X-API-Key": self.admin}
        httpx.post(self.url + "/v1/tenants", headers=headers, json={"name": tenant})  # refused when it exists
        answer = httpx.post(self.url + "/v1/keys", headers=headers, json={"tenant": tenant, "role": "trainer"})
        return str(answer.json()["api_key"])

    def stop(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=30)
        self.weed.stop()


def start(work: Path, buckets: Iterable[str] = ()) -> ServeStack:
    """Start both under ``work``; ``buckets``: more buckets for the direct-S3 baselines."""
    access, secret = "BENCH" + secrets.token_hex(6).upper(), secrets.token_urlsafe(24)
    weed = SeaweedFS(work / "s3", access_key=access, secret_key=secret)
    weed.start()
    try:
        for bucket in ("weightstore", *buckets):
            ensure_bucket(weed.endpoint_url, access, secret, bucket)
        port = 18000 + secrets.randbelow(1000)
        env = {
            **os.environ,
            "WEIGHTSTORE_DATA_DIR": str(work / "var"),
            "WEIGHTSTORE_PORT": str(port),
            "WEIGHTSTORE_S3_ENDPOINT_URL": weed.endpoint_url,
            "WEIGHTSTORE_S3_ACCESS_KEY_ID": access,
            "WEIGHTSTORE_S3_SECRET_ACCESS_KEY": secret,
            "WEIGHTSTORE_EMBEDDED_GC": "false",
            "WEIGHTSTORE_EMBEDDED_WORKER": "false",
            "WEIGHTSTORE_LOG_LEVEL": "WARNING",
        }
        log_path = work / "serve.log"
        log = open(log_path, "w")  # noqa: SIM115 - a file, not a pipe: a full pipe would stall the server
        server = subprocess.Popen([sys.executable, "-m", "weightstore_cli", "serve"], env=env, stderr=log, stdout=log, text=True)
    except BaseException:
        weed.stop()
        raise
    stack = ServeStack(f"http://127.0.0.1:{port}", "", weed, server, access, secret)
    try:
        for _ in range(600):
            found = [ln for ln in log_path.read_text().splitlines() if "bootstrap admin key" in ln]
            if found:
                stack.admin = found[0].strip().rsplit(" ", 1)[-1]
                break
            if server.poll() is not None:
                raise RuntimeError("server exited: " + log_path.read_text()[-2000:])
            time.sleep(0.1)
        for _ in range(100):
            try:
                if httpx.get(stack.url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
    except BaseException:
        stack.stop()
        raise
    return stack
