"""A small asyncio client for chatd: REST through httpx, /connect through websockets.

    api = Api("http://127.0.0.1:8000")
    await api.login("alice@example.com", "secret123")
    async with await api.connect() as sock:
        chat = await sock.request("create_chat", type="group", name="team", user_ids=[bob])
        await sock.request("send_message", chat_id=chat["id"], text="hello")
        event = await sock.next_event("new_message")

The tests use it; it is also the seed of the bot SDK.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import httpx
import websockets


class ChatdError(Exception):
    """The server answered with an error body or frame."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class Api:
    """The REST surface. Methods return the decoded JSON body or raise ChatdError."""

    def __init__(self, base_url: str, access_token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.refresh_token: str | None = None
        self.user_uuid: str | None = None

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if self.access_token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.access_token}"
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as http:
            response = await http.request(method, path, headers=headers, **kwargs)
        if response.status_code == 204:
            return None
        body = response.json()
        if response.is_error:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise ChatdError(error.get("code", "?"), error.get("message", ""), response.status_code)
        return body

    async def register(self, name: str, email: str, password: str) -> dict[str, Any]:
        body = {"name": name, "email": email, "password": password}
        return await self.call("POST", "/register", json=body)

    async def login(self, email: str, password: str) -> dict[str, Any]:
        tokens = await self.call("POST", "/login", json={"email": email, "password": password})
        self._keep(tokens)
        self.user_uuid = (await self.me())["user_uuid"]
        return tokens

    async def refresh(self) -> dict[str, Any]:
        body = {"refresh_token": self.refresh_token}
        tokens = await self.call("POST", "/token/refresh", json=body)
        self._keep(tokens)
        return tokens

    def _keep(self, tokens: dict[str, Any]) -> None:
        self.access_token = tokens["access_token"]
        self.refresh_token = tokens["refresh_token"]

    async def me(self) -> dict[str, Any]:
        return await self.call("GET", "/me")

    async def users(self, **params: Any) -> list[dict[str, Any]]:
        return (await self.call("GET", "/users_list", params=params))["users"]

    async def history(self, chat_id: int, **params: Any) -> dict[str, Any]:
        return await self.call("GET", f"/history/{chat_id}", params=params)

    async def chats(self, **params: Any) -> dict[str, Any]:
        return await self.call("GET", "/chats", params=params)

    async def chat(self, chat_id: int) -> dict[str, Any]:
        return await self.call("GET", f"/chats/{chat_id}")

    async def connect(self) -> Socket:
        ws_url = "ws" + self.base_url.removeprefix("http") + "/connect"
        return await Socket.open(ws_url, self.access_token)


class Socket:
    """One /connect socket. Replies are matched to requests; other frames queue as events."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.unread: dict[str, Any] | None = None  # the first frame, unread_messages
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, token: str | None, timeout: float = 10) -> Socket:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await websockets.connect(url, additional_headers=headers, max_size=None)
        sock = cls(ws)
        first = await asyncio.wait_for(sock._events.get(), timeout)
        if first.get("action") != "unread_messages":
            raise ChatdError("protocol", f"expected unread_messages first, got {first}")
        sock.unread = first
        return sock

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                future = self._pending.pop(frame.get("request_id") or "", None)
                if future is not None and frame.get("action") in ("ack", "error"):
                    future.set_result(frame)
                else:
                    self._events.put_nowait(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            for future in self._pending.values():
                future.cancel()

    async def request(self, action: str, timeout: float = 10, **fields: Any) -> Any:
        """Send an action and return its ack's data; raise ChatdError for an error reply."""
        request_id = f"r{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        await self.send({"action": action, "request_id": request_id, **fields})
        frame = await asyncio.wait_for(future, timeout)
        if frame["action"] == "error":
            raise ChatdError(frame["error"]["code"], frame["error"]["message"])
        return frame["data"]

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def next_event(self, action: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """Wait for the next event (of `action`, skipping others when given)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._events.get()
                if action is None or event.get("action") == action:
                    return event

    def pending_events(self) -> list[dict[str, Any]]:
        """Take every event received so far without waiting."""
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    async def wait_closed(self, timeout: float = 10) -> int | None:
        """Wait until the server closes the socket; return the close code."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self._reader

    async def __aenter__(self) -> Socket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
