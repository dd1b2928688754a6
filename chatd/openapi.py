"""The REST surface described once: each route is an `Operation`, from which chatd builds
both its Starlette routes and the OpenAPI document served at /openapi.json.

Request and response schemas come from the same msgspec Structs the handlers decode and
encode (see chatd/protocol.py), so the document cannot drift from the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter or request header."""

    name: str
    type: Any  # a Python type msgspec can describe: int, str, uuid.UUID, ...
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class Operation:
    """One REST route: where it lives, what it takes, what it returns."""

    method: str
    path: str  # Starlette syntax: "/chats/{chat_id:int}"
    endpoint: Callable[[Request], Awaitable[Response]]
    summary: str
    response: Any = None  # type of the success body; None when there is none
    status: int = 200
    body: Any = None  # type of the JSON request body, if any
    query: tuple[Param, ...] = ()
    headers: tuple[Param, ...] = ()
    auth: bool = True  # needs `Authorization: Bearer <access token>`
    errors: tuple[int, ...] = ()  # statuses besides 401 (implied by auth) it can answer


def routes(operations: list[Operation]) -> list[Route]:
    return [Route(op.path, op.endpoint, methods=[op.method]) for op in operations]
