"""What bots hear: slash commands found in messages, and the events a bot's webhook gets.

The MessageWriter reads, with the chat lock it takes anyway, how many bots a chat has
(`chats.bots`) and how many of them have a webhook (`chats.hooks`). Only when a stored
message's chat has a bot with a webhook, or has bots and the text starts with "/", does
it ask which bots (`BOTS_OF_CHATS`, one statement for the batch); `bot_events` then says
what each bot gets: a `command` event for a message that starts with one of its commands,
and, for a bot with a webhook, the event to deliver (the command, or else the message).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import msgspec

from chatd import app_hooks
from chatd.deliveries import enqueue_many
from chatd.protocol import (
    BotCommand,
    Command,
    CommandData,
    Event,
    Message,
    NewMessage,
    encode,
    parse_command,
)

# The deliveries' kind (chatd/deliveries.py) of bots' webhooks; their target is the bot's id.
WEBHOOK_KIND = "bot_webhook"

BOTS_OF_CHATS = """
SELECT cm.chat_id, b.id, b.user_id, b.username, b.commands, b.webhook_url IS NOT NULL AS hooked
FROM chat_members cm JOIN bots b ON b.user_id = cm.user_id
WHERE cm.chat_id = ANY($1::bigint[])
"""

_commands = msgspec.json.Decoder(list[BotCommand])


@dataclass(frozen=True, slots=True)
class ChatBot:
    """A bot member of a chat, as BOTS_OF_CHATS reads it."""

    bot_id: int
    user_id: uuid.UUID
    username: str
    commands: frozenset[str]
    hooked: bool

    @classmethod
    def from_row(cls, row: object) -> ChatBot:
        return cls(
            row["id"],  # type: ignore[index]
            row["user_id"],  # type: ignore[index]
            row["username"],  # type: ignore[index]
            frozenset(c.name for c in _commands.decode(row["commands"])),  # type: ignore[index]
            row["hooked"],  # type: ignore[index]
        )


def may_concern_bots(text: str, bots: int, hooks: int) -> bool:
    """Whether a message in a chat with these counts needs its bots looked up."""
    return hooks > 0 or (bots > 0 and text.startswith("/"))


@dataclass(frozen=True, slots=True)
class BotEvent:
    bot: ChatBot
    event: Event
    socket: bool  # publish it to the bot's sockets (commands; new_message went to all)
    webhook: bool  # deliver it to the bot's webhook


def bot_events(message: Message, bots: list[ChatBot]) -> list[BotEvent]:
    """What each bot of the message's chat gets for it (never its own message)."""
    command = parse_command(message.text) if not message.deleted else None
    found = []
    for bot in bots:
        if str(bot.user_id) == message.sender_uuid:
            continue
        event: Event | None = None
        if command is not None:
            name, username, args = command
            if name in bot.commands and username in (None, bot.username):
                event = Command(CommandData(message.chat_id, name, args, message))
        if event is not None:
            found.append(BotEvent(bot, event, socket=True, webhook=bot.hooked))
        elif bot.hooked:
            found.append(BotEvent(bot, NewMessage(message), socket=False, webhook=True))
    return found


def order_key(bot_id: int, chat_id: int) -> str:
    """Deliveries of one bot in one chat keep their order."""
    return f"bot:{bot_id}:chat:{chat_id}"


async def enqueue_webhooks(conn: asyncpg.Connection, sent: Iterable[BotEvent]) -> None:
    """Queue the webhook deliveries among `sent`, in the caller's transaction."""
    rows = [
        (WEBHOOK_KIND, e.bot.bot_id, order_key(e.bot.bot_id, chat_id_of(e.event)), encode(e.event))
        for e in sent
        if e.webhook
    ]
    await enqueue_many(conn, rows)


# The bots with a webhook among a chat's members, and among users who just left it.
_HOOKED_BOTS = """
SELECT b.id FROM bots b
WHERE b.webhook_url IS NOT NULL
  AND (b.user_id IN (SELECT user_id FROM chat_members WHERE chat_id = $1)
       OR b.user_id = ANY($2::uuid[]))
ORDER BY b.id
"""


async def enqueue_chat_event(
    conn: asyncpg.Connection, chat_id: int, event: Event, gone: Iterable[uuid.UUID] = ()
) -> None:
    """Queue a membership event (member_added, member_removed, chat_created,
    chat_deleted) for the chat's bots with a webhook, and those in `gone` (who just left),
    and for the app webhooks subscribed to it (chatd/app_hooks.py), in the caller's
    transaction, which holds the chat's lock."""
    bot_ids = [r["id"] for r in await conn.fetch(_HOOKED_BOTS, chat_id, list(gone))]
    body = encode(event)
    await enqueue_many(conn, [(WEBHOOK_KIND, b, order_key(b, chat_id), body) for b in bot_ids])
    await app_hooks.enqueue_chat_event(conn, chat_id, event)  # and the app's webhooks


def chat_id_of(event: Event) -> int:
    """The chat an event for a bot is about."""
    data = event.data  # type: ignore[attr-defined]
    if hasattr(data, "chat_id"):
        return data.chat_id
    if hasattr(data, "chat"):
        return data.chat.id
    return data.id  # chat_created carries the Chat
