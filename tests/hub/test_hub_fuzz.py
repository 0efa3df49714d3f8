"""No input makes the Hub surface fail with a 5xx (issue 11's rule, applied to issue 15's routes).

The native API is fuzzed from its OpenAPI schema (``tests/api/test_openapi_fuzz.py``); the Hub routes
read raw JSON and NDJSON bodies and free-form revisions and paths that the schema does not describe,
so they get their own generated inputs here: arbitrary JSON, near-valid documents of the shapes the
real client sends (preupload, LFS batch, multipart completion, NDJSON commit lines with every
operation key), and odd revisions and paths on the read routes. Every answer must be below 500, and
an error must carry the project's JSON body with a stable code.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=40)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12
)
PATHS = st.sampled_from(
    ["a.bin", "sampler_weights/x/adapter_config.json", "../x", "/abs", "files/", "a//b", "é/ü", ""]
) | st.text(max_size=30)
OIDS = st.sampled_from(["0" * 64, "f" * 64, "xyz", ""]) | st.text(alphabet="0123456789abcdef", min_size=60, max_size=66)
SIZES = st.integers(min_value=-5, max_value=2**63) | st.sampled_from([0, 1, 5 * 2**30 + 1]) | JSON


def _preupload() -> st.SearchStrategy[Any]:
    file = st.fixed_dictionaries({"path": PATHS, "size": SIZES, "sample": st.text(max_size=20)})
    return st.fixed_dictionaries({"files": st.lists(file, max_size=3) | JSON}) | JSON


def _batch() -> st.SearchStrategy[Any]:
    obj = st.fixed_dictionaries({"oid": OIDS, "size": SIZES})
    return (
        st.fixed_dictionaries(
            {
                "operation": st.sampled_from(["upload", "download", ""]) | JSON,
                "transfers": st.lists(st.sampled_from(["basic", "multipart", "xet", ""]), max_size=3) | JSON,
                "objects": st.lists(obj | JSON, max_size=3),
                "hash_algo": st.sampled_from(["sha256", "md5"]),
            }
        )
        | JSON
    )


def _completion() -> st.SearchStrategy[Any]:
    part = st.fixed_dictionaries({"partNumber": SIZES, "etag": st.text(max_size=20)})
    return st.fixed_dictionaries({"oid": OIDS, "parts": st.lists(part | JSON, max_size=3) | JSON}) | JSON


def _commit_lines() -> st.SearchStrategy[list[Any]]:
    header = st.fixed_dictionaries(
        {"key": st.just("header"), "value": st.fixed_dictionaries({"summary": st.text(max_size=10)}) | JSON}
    )
    value = st.fixed_dictionaries(
        {
            "path": PATHS,
            "content": st.text(max_size=20),
            "encoding": st.sampled_from(["base64", "utf-8", ""]),
            "algo": st.sampled_from(["sha256", "x"]),
            "oid": OIDS,
            "size": SIZES,
        }
    )
    op = st.fixed_dictionaries(
        {"key": st.sampled_from(["file", "lfsFile", "deletedFile", "deletedFolder", "copyFile", "nope"]), "value": value | JSON}
    )
    return st.lists(header | op | JSON, max_size=4)


def _dumps(doc: Any) -> str:  # noqa: ANN401 - any generated JSON value
    """JSON as a careless client writes it: ``NaN``/``Infinity`` included (not JSON: the server must say so)."""
    return json.dumps(doc, allow_nan=True)


def _check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:400])
    has_body = r.request.method != "HEAD"
    if has_body and r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        assert isinstance(body, dict) and isinstance(body.get("code"), str), (what, r.text[:400])


@pytest.mark.slow
def test_hub_routes_never_fail_with_5xx(server, keys, db_url) -> None:  # type: ignore[no-untyped-def]
    if not db_url.startswith("sqlite"):
        pytest.skip("fuzzing once (SQLite) is enough; the backends share every code path above the catalog")
    headers = {"Authorization": f"Bearer {keys.trainer}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as hub:
        assert hub.post("/api/repos/create", json={"name": "fz", "organization": "acme", "type": "model"}).status_code == 200

        @settings(
            max_examples=int(os.environ.get("WS_FUZZ_EXAMPLES", "30")),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.generate],
        )
        @given(
            create=JSON,
            preupload=_preupload(),
            batch=_batch(),
            completion=_completion(),
            carrier=st.text(max_size=20),
            oid=OIDS,
            token=st.text(max_size=20),
            lines=_commit_lines(),
            raw=st.binary(max_size=60),
            rev=st.sampled_from(["main", "sampler_weights/x", "refs/pr/1", "%2F", ".."]) | st.text(max_size=20),
            path=PATHS,
        )
        def run(**g: Any) -> None:  # noqa: ANN401 - hypothesis keyword arguments
            _check(hub.post("/api/repos/create", content=_dumps(g["create"])), "create")
            _check(hub.post("/api/models/acme/fz/preupload/main", content=_dumps(g["preupload"])), "preupload")
            _check(hub.post("/acme/fz.git/info/lfs/objects/batch", content=_dumps(g["batch"])), "batch")
            carrier, oid = quote(g["carrier"] or "x", safe=""), quote(g["oid"] or "x", safe="")
            done = httpx.post(
                f"{server.url}/acme/fz.git/info/lfs/complete/{carrier}/{oid}",
                params={"token": g["token"]},
                content=_dumps(g["completion"]),
            )
            _check(done, "complete")
            ndjson = "\n".join(_dumps(line) for line in g["lines"]).encode()
            for body in (ndjson, g["raw"]):
                _check(
                    hub.post("/api/models/acme/fz/commit/main", content=body, headers={"Content-Type": "application/x-ndjson"}),
                    "commit",
                )
            rev, path = quote(g["rev"], safe="/"), quote(g["path"], safe="/")
            for method, url in (
                ("GET", f"/api/models/acme/fz/revision/{rev}"),
                ("GET", f"/api/models/acme/fz/tree/{rev}/{path}"),
                ("HEAD", f"/acme/fz/resolve/{rev}/{path}"),
                ("GET", f"/acme/fz/resolve/{rev}/{path}"),
            ):
                _check(hub.request(method, url, follow_redirects=False), f"{method} {url}")

        run()


def test_what_the_fuzzer_found_is_a_clean_4xx(server, keys, db_url) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzzer above (both failed before their fix):

    1. an error message echoing client text with a control character (a multipart completion's carrier
       id) went into ``X-Error-Message`` as is; the server could not send that header and dropped the
       connection (a 5xx to the client). Every Hub error header is now printable ASCII, whatever the
       message (``routers.hub.header_text``), tried here on every route family;
    2. an LFS batch whose ``transfers`` was not a list of names was a 500 (type confusion in the
       hand-read JSON body)."""
    if not db_url.startswith("sqlite"):
        pytest.skip("header rendering does not depend on the catalog")
    headers = {"Authorization": f"Bearer {keys.trainer}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as hub:
        assert hub.post("/api/repos/create", json={"name": "hdr", "organization": "acme", "type": "model"}).status_code == 200
        odd = ["/acme/hdr/resolve/main/a%01b%02c", "/api/models/acme/hdr/tree/%7F%00/x"]
        odd.append("/api/models/acme/hdr/revision/%1B%C3%A9")
        odd.append(f"/acme/hdr.git/info/lfs/complete/upl%01x/{'0' * 64}?token=t")  # the one the fuzzer found
        for url in odd:
            body = {"oid": "y", "parts": []} if "/lfs/" in url else None
            r = hub.request("POST" if body else "GET", url, json=body, follow_redirects=False)
            assert 400 <= r.status_code < 500, (url, r.status_code, r.text[:200])
            _printable_error_header(r, url)
        lines = [
            {"key": "header", "value": {"summary": "x"}},
            {"key": "file", "value": {"path": "f\u0001/\u0002.json", "content": "e30="}},
        ]
        ndjson = "\n".join(json.dumps(line) for line in lines).encode()
        r = hub.post("/api/models/acme/hdr/commit/main", content=ndjson, headers={"Content-Type": "application/x-ndjson"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
        _printable_error_header(r, "commit")
        for transfers in (5, "basic", [1], {"basic": 1}):
            batch = {"operation": "upload", "transfers": transfers, "objects": []}
            r = hub.post("/acme/hdr.git/info/lfs/objects/batch", json=batch)
            assert r.status_code == 400 and r.json()["code"] == "invalid_request", (transfers, r.status_code, r.text[:200])


def _printable_error_header(r: httpx.Response, what: str) -> None:
    assert "X-Error-Message" in r.headers, (what, dict(r.headers), r.text[:300])
    message = r.headers["X-Error-Message"]
    assert message and all(" " <= c <= "~" for c in message), message
