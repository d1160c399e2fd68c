"""HTTP guards of the daemon's app, as plain ASGI middleware (they see every route, the UI's included):

- `BodyLimit`: a request body larger than `max_bytes` is refused with 413 before it is read into memory (by its
  Content-Length, or, for a chunked body, as soon as the bytes received pass the limit).
- `SecurityHeaders`: the UI gets a Content-Security-Policy (own scripts and styles only, images also from blob:
  URLs, which the UI uses for token-protected artifacts; `frame-ancestors 'none'`), and every answer
  `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`. The Swagger
  docs page (`/docs`, scripts from a CDN) gets no CSP.
"""

from __future__ import annotations

import json
from typing import Any

MAX_BODY_BYTES = 32 * 1024 * 1024  # a label mask (20 MiB at most) plus the form around it

UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
          "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_UI_PATHS = ("/", "/index.html")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _answer(send, 400, "bad Content-Length")
                    return
                if declared > self.max_bytes:
                    await _answer(send, 413, f"request body is {declared} bytes, more than {self.max_bytes}")
                    return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _answer(send, 413, f"request body is more than {self.max_bytes} bytes")


class SecurityHeaders:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        ui = path in _UI_PATHS or path.startswith("/static/")
        api = path.startswith("/api/")

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer")]
                if ui:
                    headers.append((b"content-security-policy", UI_CSP.encode()))
                # API answers are the daemon's state now (and carry tokens' data): no browser or proxy keeps a copy;
                # routes that serve immutable files set their own
                if api and not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _answer(send: Any, code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
