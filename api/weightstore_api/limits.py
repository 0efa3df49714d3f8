"""The one limit on JSON request bodies, for every route: size, nesting depth, finite numbers.

``JsonBodyLimit`` is ASGI middleware: for a request whose ``Content-Type`` is JSON (the only bodies
FastAPI parses as JSON: its strict content-type default leaves others unparsed) it reads the body,
at most ``Settings.max_json_body_bytes`` of it, and checks it with ``weightstore.formats.parse_json``
before any route sees it; the body is then replayed unchanged. A refusal is the usual error body
(413 ``too_large`` past the size cap, 400 ``invalid_request`` otherwise) on a connection that stays
open. The file-stream route is exempt: its body is a file's bytes, validated at commit by
``weightstore.formats`` whatever ``Content-Type`` a client puts on it.
"""

from __future__ import annotations

import email.message
import re

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from weightstore.errors import InvalidRequest, QuotaExceeded, WeightstoreError
from weightstore.formats import parse_json

from .errors import weightstore_error_handler

FILE_STREAM_PATH = re.compile(r"^/v1/uploads/[^/]+/files/")
"""``stream_upload_file``: raw file bytes, not a JSON document."""


def is_json_content_type(value: str | None) -> bool:
    """FastAPI's own test for a JSON body: ``application/json`` or ``application/*+json``."""
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class JsonBodyLimit:
    """Refuse oversized, too deeply nested or non-finite JSON bodies before routing (see module doc)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or FILE_STREAM_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = dict((k.lower(), v) for k, v in scope.get("headers", []))
        if not is_json_content_type(headers.get(b"content-type", b"").decode("latin-1")):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(receive, headers.get(b"content-length"))
            if body:
                parse_json(body, max_bytes=self.max_bytes, name="request body")
        except WeightstoreError as exc:
            response = await weightstore_error_handler(Request(scope), exc)
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, content_length: bytes | None) -> bytes:
        too_large = QuotaExceeded(f"request body: JSON over the {self.max_bytes}-byte cap")
        if content_length is not None and content_length.isdigit() and int(content_length) > self.max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequest("request body: client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body over once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
