"""The client sends an idempotent request once more when the server dropped a reused keep-alive
connection without answering (found by the reliability harness: a GET racing uvicorn's keep-alive
close surfaced as ``RemoteProtocolError``). Non-idempotent requests are never re-sent."""

from __future__ import annotations

import httpx
import pytest

from weightstore.client import Client
from weightstore.errors import ServiceUnavailable


def _client_with(transport: httpx.MockTransport) -> Client:
    c = Client("http://weightstore.test", "tml-x", hash_cache=False)
    c.http = httpx.Client(base_url="http://weightstore.test", transport=transport)  # fault injection only
    return c


def _dropping_first(calls: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_idempotent_request_is_sent_again_after_a_dropped_connection(method: str) -> None:
    calls: list[str] = []
    assert _client_with(_dropping_first(calls))._call(method, "/v1/runs") == {"ok": True}
    assert calls == [method, method]


def test_post_is_not_sent_again() -> None:
    """A POST that may have reached the server is not repeated; the caller gets the typed transient
    error saying so (issue 13, found 8: no raw httpx errors), not ``RemoteProtocolError``."""
    calls: list[str] = []
    with pytest.raises(ServiceUnavailable, match="may or may not have been applied"):
        _client_with(_dropping_first(calls))._call("POST", "/v1/uploads", json={})
    assert calls == ["POST"]
