"""HTTP plumbing of the front end: reading a request body within its limits and deadline, the shape checks every
endpoint shares, and uvicorn's protocol with a deadline for a request's headers."""
from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..config import ServerConfig
from .access import HTTPError

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer" (logged, never sent)
log = logging.getLogger("pyengine.serving")


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused past `limit` bytes (413) or when it does not arrive within `timeout` seconds (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise HTTPError(408, f"request body not received within {timeout} s ({len(body)} bytes came)") from None
    except ClientDisconnect:
        raise HTTPError(CLIENT_CLOSED, "the client closed the connection while sending the body") from None
    return bytes(body)


async def read_json(request: Request, limit: int, timeout: float) -> Any:
    """The body as JSON (or a form for the LibreTranslate API), refused past `limit` bytes, when it does not arrive
    within `timeout` seconds, or when it is not UTF-8 / not JSON (NaN and Infinity, numbers of more than 4300
    digits and nesting deeper than Python's recursion limit included)."""
    body = await read_body(request, limit, timeout)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, f"request body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {k: v[0] if len(v) == 1 else v for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HTTPError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # integers past Python's digit limit, NaN / Infinity
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_texts(texts: Any, field: str, config: ServerConfig) -> list[str]:
    """A non-empty list of strings within the limits; the first offending item is named."""
    if not isinstance(texts, list):
        raise HTTPError(400, f"'{field}' must be a list of strings, got {json_type(texts)}")
    if len(texts) > config.max_texts:
        raise HTTPError(413, f"{len(texts)} texts exceed the limit of {config.max_texts} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise HTTPError(400, f"{field}[{i}] must be a string, got {json_type(text)}")
        if len(text) > config.max_chars:
            raise HTTPError(413, f"{field}[{i}] has {len(text)} characters, over the limit of {config.max_chars}")
    return texts


def json_type(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def header_timeout_protocol(timeout: float) -> type:
    """uvicorn's httptools protocol with a deadline for a request's headers: a connection that opens and sends
    nothing, or stalls inside its headers, gets 408 and is closed after `timeout` seconds instead of being held
    forever (uvicorn's own keep-alive timeout only starts after a first response). The body's deadline is
    read_json's."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    body = json.dumps({"error": f"request headers not received within {timeout} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        header_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self.header_deadline is None:
                self.header_deadline = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def _expired(self) -> None:
            self.header_deadline = None
            if not self.transport.is_closing():
                log.info("closing a connection that sent no complete headers within %s s", timeout)
                self.transport.write(answer)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
