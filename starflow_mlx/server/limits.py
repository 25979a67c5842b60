"""How long and how many: the bounds on connections that keep a few slow or idle clients from locking out the rest.

Each open connection holds a file; macOS gives a process 256 by default. Uncapped, a few hundred connections that
never finish their request lock everyone out, so:

- :class:`BoundedH11Protocol` (uvicorn's h11 protocol) closes a connection whose request line and headers have not
  all arrived ``head_seconds`` after it opened (or after its previous response), and closes at once any connection
  beyond the cap, rather than holding its file. An unfinished head is held up to ``HEAD_BYTES``, then
  answered 400.
- :class:`BodyLimits` (ASGI) reads each body within ``seconds`` and ``max_bytes`` before the app sees it: 408 or 413
  otherwise, and the connection is closed.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from starflow_mlx.server.api_error import ApiError

HEAD_SECONDS = 10.0  # a real client sends its headers in one packet
BODY_SECONDS = 30.0  # 64 KB at the slowest link worth serving
KEEP_ALIVE_SECONDS = 5  # uvicorn's default, stated: an idle connection between requests
HEAD_BYTES = 16 * 1024  # a real client's request line and headers are well under 1 KB (h11's default, stated)
MAX_CONNECTIONS = 1000
FILES_KEPT = 64  # for the model's files, the job folders, logs, the listening socket


def connection_limit() -> int:
    """Connections served at once: half the process's open-file limit (256 on macOS: 128), so those stay free."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft // 2, soft - FILES_KEPT))


def server_config(app, head_seconds: float = HEAD_SECONDS, connections: int | None = None, **options):
    """uvicorn's config for ``app`` with these bounds (``options`` go to uvicorn.Config)."""
    protocol = type("BoundedH11Protocol", (BoundedH11Protocol,), {"head_seconds": head_seconds})
    return uvicorn.Config(app, http=protocol, limit_concurrency=connections or connection_limit(),
                          timeout_keep_alive=KEEP_ALIVE_SECONDS, h11_max_incomplete_event_size=HEAD_BYTES,
                          log_level="warning", **options)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's head and a cap on connections."""

    head_seconds = HEAD_SECONDS
    head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            transport.close()  # refused now: held, it would keep a file until the client gave up
            return
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def connection_lost(self, exc) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.head_seconds, self._head_late)

    def _head_late(self) -> None:
        # IDLE: the client has not sent a whole request line and headers since the connection (or its last
        # response) began; once it has, the body's own deadline applies.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class BodyLimits:
    """ASGI middleware: the whole body within ``seconds`` and ``max_bytes``, replayed to ``app``.

    ``uploads`` maps the paths that take files to their own larger cap (a POST there may send up to it).
    ``error(status, message, code)`` makes the refusal in the app's error shape.
    """

    def __init__(self, app, max_bytes: int, seconds: float, error, uploads: dict[str, int] | None = None):
        self.app, self.max_bytes, self.seconds, self.error = app, max_bytes, seconds, error
        self.uploads = uploads or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.uploads.get(scope.get("path"), self.max_bytes) if scope.get("method") == "POST" \
            else self.max_bytes
        too_large = (413, f"the request body is larger than {limit} bytes", "request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(too_large, scope, receive, send)
            return
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.seconds):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        await self._refuse(too_large, scope, receive, send)
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse((408, f"the request body did not arrive within {self.seconds:g} s", "request_timeout"),
                               scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: the client's disconnect, for streamed answers
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, refusal, scope, receive, send) -> None:
        response = self.error(*refusal)
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


async def read_body(request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as its declared or received size passes ``limit``: a large upload is
    never read past the limit, whatever its Content-Length says."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", "request_too_large")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    return data
