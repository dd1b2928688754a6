"""A real HTTP server that receives what chatd POSTs (webhooks, pushes), for tests.

    async with Receiver() as receiver:          # uvicorn on a free port, in this loop
        ... receiver.url("/hook") ...
        received = await receiver.wait_for(3)   # the first three requests, in arrival order

`answer(request)` decides each response: by default 200 with an empty JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Answer = Callable[[Received], Awaitable[Response] | Response]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    def __init__(self, answer: Answer | None = None, port: int | None = None) -> None:
        """`port`: a fixed one (a chatd started earlier was told its URL), else a free one."""
        self.answer = answer
        self.requests: list[Received] = []
        self._arrived = asyncio.Condition()
        self.port = port or _free_port()
        app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _receive(self, request: Request) -> Response:
        received = Received(
            "/" + request.path_params["path"],
            {k.lower(): v for k, v in request.headers.items()},
            await request.body(),
        )
        async with self._arrived:
            self.requests.append(received)
            self._arrived.notify_all()
        if self.answer is None:
            return Response(b"{}", media_type="application/json")
        response = self.answer(received)
        if isinstance(response, Response):
            return response
        return await response

    async def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        """The first `count` requests, once they have arrived."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.requests) >= count), timeout
            )
            return self.requests[:count]

    async def __aenter__(self) -> Receiver:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
