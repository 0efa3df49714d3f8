"""Property-based API fuzzing (schemathesis) of the native API, in-process against the real stack.

Checks: no 5xx for any input the schema allows or forbids, responses match their declared schema,
and every status code returned is documented.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from weightstore import auth, db


@pytest.fixture
def fuzz_app(ctx):
    from weightstore_api.app import create_app
    from weightstore_gc import LocalCollector

    app = create_app(ctx, collector=LocalCollector())  # wired like `weightstore serve`
    with db.session_scope(ctx.engine) as s:
        key = auth.create_key(s, tenant="fuzz", role="trainer", now=ctx.clock.now())[1]
    return app, key


@pytest.mark.slow
def test_native_api_never_fails_with_5xx(fuzz_app, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("fuzzing once (SQLite) is enough; the backends share every code path above the catalog")
    app, key = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [op.ok() for op in schema.get_all_operations()]
    native = [op for op in ops if op.path.startswith("/v1/") and "/files/{path}" not in op.path]
    assert native, "no native operations found"
    failures: list[str] = []
    for op in native:
        test = _fuzz(op, key)
        try:
            test()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:600]}")
    assert not failures, "\n\n".join(failures)


def _fuzz(op, key: str):  # type: ignore[no-untyped-def]
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(op.as_strategy())
    def run(case) -> None:  # type: ignore[no-untyped-def]
        case.headers = {**(case.headers or {}), "X-API-Key": key}
        response = case.call()
        case.validate_response(response, checks=(not_a_server_error, status_code_conformance, response_schema_conformance))

    return run
