"""Bots for chatd in a few lines: handlers for messages, commands and events, run over the
socket (`bot.run()`) or as a webhook receiver (`bot.asgi_app()`).

    import random
    from chatd.bot import Bot, CommandEvent

    bot = Bot("http://127.0.0.1:8000", "chatd_bot_...")     # POST /bots gave the token

    @bot.command("roll", description="Roll a die")
    async def roll(event: CommandEvent) -> None:
        await event.reply(f"🎲 {random.randint(1, 6)}")

    bot.run()

Handlers get typed events whose payloads are chatd.protocol's Structs (the wire contract):

- `@bot.on_message`: a `MessageEvent` (`.message` is a `Message`) for every message of
  others in the bot's chats that is not one of its commands;
- `@bot.command("roll")`: a `CommandEvent` (`.command`, `.args`, `.message`) for
  "/roll …" or "/roll@<its username> …". The commands are registered with the server when
  the bot starts (PUT /bots/{id}/commands), so the web client offers them on "/";
- `@bot.on_event("member_added")`: a `ChatEvent` (`.frame` is the `MemberAdded`, and so
  on for any event action: `member_removed`, `chat_created`, `message_updated`, ...).

`await event.reply(text)` answers in the event's chat, once (a reply is never posted twice,
even when the server retries a webhook delivery or the socket drops mid-send).

Over the socket, events come through `chatd.client.Client`: it reconnects and resumes, so
every message (and command) reaches the bot exactly once, those sent while it was away
included. As a webhook receiver, `asgi_app()` is an ASGI application (run it with any ASGI
server: `uvicorn mybot:app`) that refuses requests without a valid signature
(chatd.signing, with the secret PATCH /bots/{id} gave), answers a delivery it has already
handled with the same answer (deliveries are at least once), and returns the first reply
as {"text": …}, which the server posts.

This module, chatd.client, chatd.protocol and chatd.signing need only httpx, websockets
and msgspec: `pip install ./sdk` installs them without the server (see docs/bots.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from chatd import signing
from chatd.client import Api, ChatdError, Client, TokenProvider
from chatd.protocol import (
    BotCommand,
    Command,
    CommandData,
    Message,
    NewMessage,
    ServerFrame,
    parse_command,
)

log = logging.getLogger("chatd.bot")

MAX_WEBHOOK_BODY = 1024 * 1024
REMEMBERED_DELIVERIES = 10_000  # answers kept to repeat to a redelivery


# --- events ----------------------------------------------------------------------------------


@dataclass
class _Replies:
    """Where an event's replies go: over the socket, or into the webhook's answer."""

    send: Callable[[int, str, str], Awaitable[Any]]  # (chat_id, text, client_msg_id)
    key: str  # makes each reply's client_msg_id: a retried event posts nothing twice
    count: int = 0

    async def post(self, chat_id: int, text: str) -> Any:
        self.count += 1
        return await self.send(chat_id, text, f"{self.key}-{self.count}"[:64])


@dataclass
class ChatEvent:
    """An event of one of the bot's chats: `frame` is the chatd.protocol Struct."""

    bot: Bot
    frame: Any  # MemberAdded, MemberRemoved, ChatCreated, MessageUpdated, ...
    _replies: _Replies = field(repr=False)

    @property
    def action(self) -> str:
        return self.frame.__struct_config__.tag

    @property
    def data(self) -> Any:
        return self.frame.data

    @property
    def chat_id(self) -> int | None:
        data = self.frame.data
        for value in (
            getattr(data, "chat_id", None),
            getattr(getattr(data, "chat", None), "id", None),
            getattr(data, "id", None) if self.action == "chat_created" else None,
        ):
            if isinstance(value, int):
                return value
        return None

    async def reply(self, text: str) -> Any:
        """Post `text` in this event's chat, as the bot."""
        chat_id = self.chat_id
        if chat_id is None:
            raise ValueError(f"a {self.action} event belongs to no chat")
        return await self._replies.post(chat_id, text)


@dataclass
class MessageEvent(ChatEvent):
    """A new message of someone else in one of the bot's chats."""

    @property
    def message(self) -> Message:
        return self.frame.data if isinstance(self.frame, NewMessage) else self.frame.data.message

    @property
    def text(self) -> str:
        return self.message.text

    @property
    def sender_uuid(self) -> str:
        return self.message.sender_uuid

    @property
    def chat_id(self) -> int:
        return self.message.chat_id


@dataclass
class CommandEvent(MessageEvent):
    """A message that starts with one of the bot's commands: `/command args`."""

    @property
    def command(self) -> str:
        return self.frame.data.command

    @property
    def args(self) -> str:
        return self.frame.data.args


MessageHandler = Callable[[MessageEvent], Awaitable[Any]]
CommandHandler = Callable[[CommandEvent], Awaitable[Any]]
EventHandler = Callable[[ChatEvent], Awaitable[Any]]

_frame_decoder = msgspec.json.Decoder(ServerFrame)


# --- the bot ---------------------------------------------------------------------------------


async def _provide(provider: TokenProvider) -> str:
    token = provider()
    if inspect.isawaitable(token):
        token = await token
    return token


class Bot:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_provider: TokenProvider | None = None,
        webhook_secret: str | None = None,
        signature_tolerance: int = signing.DEFAULT_TOLERANCE,
    ) -> None:
        """`url`: the chatd server; `token`: the bot's token (`chatd_bot_…`), or
        `token_provider`: a callable (plain or async) returning a fresh access token, for
        a bot that signs in through the embedding app (its JWTs, docs/embedding.md), asked
        again whenever chatd refuses the one it has; `webhook_secret`: the bot's
        `webhook_secret` (PATCH /bots/{id}), for asgi_app."""
        if (token is None) == (token_provider is None):
            raise ValueError("give the bot a token or a token_provider")
        self.url = url.rstrip("/")
        self.token = token
        self.token_provider = token_provider
        self.webhook_secret = webhook_secret
        self.signature_tolerance = signature_tolerance
        self.api = Api(self.url, token)
        self.me: dict[str, Any] = {}
        self.client: Client | None = None
        self._message_handlers: list[MessageHandler] = []
        self._commands: dict[str, tuple[CommandHandler, str]] = {}
        self._event_handlers: dict[str, list[EventHandler]] = {}
        self._answers: OrderedDict[str, bytes] = OrderedDict()
        self._setup_lock = asyncio.Lock()
        self._ready = False

    # -- decorators ---------------------------------------------------------------------------

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Call `handler` with each new message of others that is not one of its commands."""
        self._message_handlers.append(handler)
        return handler

    def command(
        self, name: str, description: str = ""
    ) -> Callable[[CommandHandler], CommandHandler]:
        """Call the handler for "/name …" (registered with the server at start)."""
        name = name.lower().lstrip("/")

        def register(handler: CommandHandler) -> CommandHandler:
            self._commands[name] = (handler, description)
            return handler

        return register

    def on_event(self, action: str) -> Callable[[EventHandler], EventHandler]:
        """Call the handler with every event of this action ("member_added", ...)."""

        def register(handler: EventHandler) -> EventHandler:
            self._event_handlers.setdefault(action, []).append(handler)
            return handler

        return register

    # -- what handlers may use ----------------------------------------------------------------

    @property
    def user_uuid(self) -> str | None:
        return self.me.get("user_uuid")

    async def send(self, chat_id: int, text: str, client_msg_id: str | None = None) -> Any:
        """Post a message in a chat of the bot's, over REST (sent once per client_msg_id)."""
        headers = {"Idempotency-Key": client_msg_id or str(uuid.uuid4())}
        return await self._rest(
            "POST", f"/chats/{chat_id}/messages", json={"text": text}, headers=headers
        )

    async def _rest(self, method: str, path: str, **kwargs: Any) -> Any:
        """A REST call; with a token provider, a refused token is replaced once."""
        if self.token_provider is not None and self.api.access_token is None:
            self.api.access_token = await _provide(self.token_provider)
        try:
            return await self.api.call(method, path, **kwargs)
        except ChatdError as exc:
            if exc.status != 401 or self.token_provider is None:
                raise
        self.api.access_token = await _provide(self.token_provider)
        return await self.api.call(method, path, **kwargs)

    async def setup(self) -> None:
        """Learn who the bot is, and register its commands (once)."""
        async with self._setup_lock:
            if self._ready:
                return
            self.me = await self._rest("GET", "/me")
            if self.me.get("bot_id") is not None and self._commands:
                commands = [BotCommand(name, d) for name, (_, d) in self._commands.items()]
                await self._rest(
                    "PUT",
                    f"/bots/{self.me['bot_id']}/commands",
                    json={"commands": msgspec.to_builtins(commands)},
                )
            self._ready = True

    # -- dispatching ----------------------------------------------------------------------------

    async def dispatch(self, frame: Any, replies: _Replies) -> None:
        """Run the handlers `frame` (a chatd.protocol Struct) calls for."""
        if isinstance(frame, NewMessage):
            message = frame.data
            if message.sender_uuid == self.user_uuid or message.deleted:
                return
            command = self._own_command(message.text)
            if command is not None:
                name, args = command
                frame = Command(CommandData(message.chat_id, name, args, message))
            else:
                for handler in self._message_handlers:
                    await self._call(handler, MessageEvent(self, frame, replies))
        if isinstance(frame, Command):
            entry = self._commands.get(frame.data.command)
            if entry is not None and frame.data.message.sender_uuid != self.user_uuid:
                await self._call(entry[0], CommandEvent(self, frame, replies))
            return
        if isinstance(frame, NewMessage):
            return
        for handler in self._event_handlers.get(frame.__struct_config__.tag, ()):
            await self._call(handler, ChatEvent(self, frame, replies))

    def _own_command(self, text: str) -> tuple[str, str] | None:
        parsed = parse_command(text)
        if parsed is None:
            return None
        name, username, args = parsed
        mine = (self.me.get("bot_username") or "").lower()
        if name not in self._commands or username not in (None, mine):
            return None
        return name, args

    async def _call(self, handler: Callable[[Any], Awaitable[Any]], event: ChatEvent) -> None:
        try:
            await handler(event)
        except Exception:
            log.exception("bot handler %s failed on %s", handler.__name__, event.action)

    # -- over the socket ------------------------------------------------------------------------

    def run(self) -> None:
        """Run over the socket until interrupted (Ctrl-C)."""
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self.run_async())

    async def run_async(self, started: asyncio.Event | None = None) -> None:
        """Run over the socket until cancelled, or until the token is refused (raised)."""
        self.client = Client(self.url, token=self.token, token_provider=self.token_provider)
        await self.client.start()
        # Once the socket is up: a command the web client offers from now on is heard.
        await self.setup()
        if started is not None:
            started.set()
        try:
            async for event in self.client.events():
                typed = event.typed
                # A command comes twice on a socket, as its new_message and as a command
                # event: the new_message is the one the Client resumes exactly once.
                if typed is None or isinstance(typed, Command):
                    continue
                replies = _Replies(self._send_on_socket, f"r{uuid.uuid4().hex}")
                await self.dispatch(typed, replies)
        finally:
            await self.client.close()
            await self.api.aclose()

    async def _send_on_socket(self, chat_id: int, text: str, client_msg_id: str) -> Any:
        assert self.client is not None
        return await self.client.send(chat_id, text, client_msg_id)

    # -- as a webhook receiver ------------------------------------------------------------------

    def asgi_app(self) -> Callable[..., Awaitable[None]]:
        """An ASGI application receiving the bot's webhook deliveries (POST, any path)."""
        if not self.webhook_secret:
            raise ValueError("asgi_app needs the bot's webhook_secret")
        secret = self.webhook_secret.encode()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await _lifespan(receive, send, self.setup)
                return
            if scope["type"] != "http":
                return
            if scope["method"] != "POST":
                await _respond(send, 405, b'{"error": "POST only"}')
                return
            body = await _read_body(receive)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            if body is None:
                await _respond(send, 413, b'{"error": "body too large"}')
                return
            if not signing.verify(secret, body, headers, self.signature_tolerance):
                await _respond(send, 401, b'{"error": "bad signature"}')
                return
            status, answer = await self.handle_delivery(
                body, headers.get(signing.DELIVERY.lower(), "")
            )
            await _respond(send, status, answer)

        return app

    async def handle_delivery(self, body: bytes, delivery_id: str) -> tuple[int, bytes]:
        """One verified delivery: (status, answer). A delivery handled already gets the
        answer it got then, and runs no handler again."""
        known = self._answers.get(delivery_id)
        if known is not None:
            return 200, known
        try:
            frame = _frame_decoder.decode(body)
        except msgspec.DecodeError:
            return 200, b"{}"  # an event this SDK does not know: nothing to do
        await self.setup()
        texts: list[str] = []
        extra: list[tuple[int, str, str]] = []

        async def collect(chat_id: int, text: str, client_msg_id: str) -> Any:
            # The first reply goes back in the answer (the server posts it once); any
            # more are posted now, each once (client_msg_id from the delivery).
            if not texts:
                texts.append(text)
                return None
            extra.append((chat_id, text, client_msg_id))
            return await self.send(chat_id, text, client_msg_id)

        await self.dispatch(frame, _Replies(collect, f"wh{delivery_id}"))
        answer = msgspec.json.encode({"text": texts[0]} if texts else {})
        self._answers[delivery_id] = answer
        while len(self._answers) > REMEMBERED_DELIVERIES:
            self._answers.popitem(last=False)
        return 200, answer


async def _read_body(receive: Any) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_WEBHOOK_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any, setup: Callable[[], Awaitable[None]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await setup()
            except Exception as exc:  # the server is down: the first delivery retries it
                log.warning("bot setup failed at start-up (%s); retrying on first delivery", exc)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


__all__ = [
    "Bot",
    "ChatEvent",
    "CommandEvent",
    "MessageEvent",
]
