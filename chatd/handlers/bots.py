"""Bots, API tokens and slash commands.

A bot is a user flagged `is_bot` with a row of `bots`: its owner, its unique username, its
commands and its webhook. It has no password (it cannot log in) and authenticates with its
tokens, `chatd_bot_…`. A person's scripts use personal access tokens, `chatd_pat_…`,
with the scopes `read` and `write`. Both kinds are sessions of their user
(chatd/tokens.py): revoking one is revoking a session, on every node, sockets included.

Only the bot's owner sees or changes it, and only from a login (handlers/__init__.py
`LOGIN_ONLY`): a leaked token cannot mint more tokens or point a bot's webhook elsewhere.
The bot itself may set its own commands (the SDK registers its decorators' commands).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from chatd import tokens
from chatd.deliveries import url_problem
from chatd.handlers.base import Context
from chatd.protocol import (
    FORBIDDEN,
    INVALID,
    MAX_DEVICE_CHARS,
    MAX_USER_NAME_CHARS,
    NOT_FOUND,
    UNAVAILABLE,
    USERNAME_TAKEN,
    Bot,
    BotCommand,
    BotCreated,
    BotList,
    ChatCommand,
    ChatCommandList,
    ChatCommands,
    ChatError,
    CommandList,
    CreateBot,
    CreateBotToken,
    CreateToken,
    DeleteBot,
    GetBot,
    GetCommands,
    ListBots,
    ListBotTokens,
    ListTokens,
    NewToken,
    RevokeBotToken,
    RevokeToken,
    SetCommands,
    TokenInfo,
    TokenList,
    UpdateBot,
    clean_text,
    no_such_chat,
)
from chatd.revocations import Revocation

MAX_BOTS_PER_OWNER = 20
MAX_TOKENS_PER_BOT = 20
MAX_TOKENS_PER_USER = 50  # personal access tokens

_BOT_COLUMNS = """
b.id, b.user_id, b.username, u.name, b.owner_id, b.created_at, b.commands, b.webhook_url,
b.webhook_secret
"""

_commands_decoder = msgspec.json.Decoder(list[BotCommand])


def bot_from_row(row: asyncpg.Record) -> Bot:
    return Bot(
        id=row["id"],
        user_uuid=str(row["user_id"]),
        username=row["username"],
        name=row["name"],
        owner_uuid=str(row["owner_id"]),
        created_at=row["created_at"],
        commands=_commands_decoder.decode(row["commands"]),
        webhook_url=row["webhook_url"],
        webhook_secret=row["webhook_secret"],
    )


def no_such_bot() -> ChatError:
    # The same answer whether the bot does not exist or is someone else's.
    return ChatError(NOT_FOUND, "no such bot")


async def _owned_bot(
    conn: asyncpg.Connection | asyncpg.Pool, ctx: Context, bot_id: int, *, lock: bool = False
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {_BOT_COLUMNS} FROM bots b JOIN users u ON u.id = b.user_id"
        f" WHERE b.id = $1 AND b.owner_id = $2{' FOR UPDATE OF b' if lock else ''}",
        bot_id,
        ctx.user_id,
    )
    if row is None:
        raise no_such_bot()
    return row


# --- bots ----------------------------------------------------------------------------------


async def insert_bot_user(conn: asyncpg.Connection, name: str, kind: str) -> uuid.UUID:
    """A new bot user (a bot's, or an incoming webhook's): no password (none verifies '!'),
    a placeholder email that no one can register."""
    bot_user = uuid.uuid4()
    await conn.execute(
        "INSERT INTO users (id, name, email, password_hash, is_bot) VALUES ($1, $2, $3, '!', true)",
        bot_user,
        name,
        f"{kind}-{bot_user}@bots.invalid",
    )
    return bot_user


async def create_bot(ctx: Context, action: CreateBot) -> BotCreated:
    name = clean_text(action.name, "name", min_len=1, max_len=MAX_USER_NAME_CHARS)
    username = action.username.lower()
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        # The owner's row: their bot creations take turns, so the cap holds.
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", ctx.user_id)
        count = await conn.fetchval("SELECT count(*) FROM bots WHERE owner_id = $1", ctx.user_id)
        if count >= MAX_BOTS_PER_OWNER:
            raise ChatError(FORBIDDEN, f"at most {MAX_BOTS_PER_OWNER} bots per user")
        bot_user = await insert_bot_user(conn, name, "bot")
        bot_id = await conn.fetchval(
            "INSERT INTO bots (user_id, owner_id, username) VALUES ($1, $2, $3)"
            " ON CONFLICT (username) DO NOTHING RETURNING id",
            bot_user,
            ctx.user_id,
            username,
        )
        if bot_id is None:
            raise ChatError(USERNAME_TAKEN, "another bot has this username")
        token = await issue_token(conn, ctx, bot_user, "bot", "token", None)
        row = await _owned_bot(conn, ctx, bot_id)
    return BotCreated(bot_from_row(row), token)


async def list_bots(ctx: Context, action: ListBots) -> BotList:
    rows = await ctx.node.pool.fetch(
        f"SELECT {_BOT_COLUMNS} FROM bots b JOIN users u ON u.id = b.user_id"
        " WHERE b.owner_id = $1 ORDER BY b.id",
        ctx.user_id,
    )
    return BotList([bot_from_row(r) for r in rows])


async def get_bot(ctx: Context, action: GetBot) -> Bot:
    return bot_from_row(await _owned_bot(ctx.node.pool, ctx, action.bot_id))


# Recounts `hooks` of the chats a bot is in, locked in id order (as the MessageWriter locks
# them): its webhook came or went.
_RECOUNT_HOOKS = """
UPDATE chats c SET hooks = (
    SELECT count(*) FROM chat_members cm JOIN bots b ON b.user_id = cm.user_id
    WHERE cm.chat_id = c.id AND b.webhook_url IS NOT NULL
)
WHERE c.id = ANY($1::bigint[])
"""


_BOT_CHATS = """
SELECT coalesce(array_agg(cm.chat_id ORDER BY cm.chat_id), '{}')
FROM chat_members cm JOIN bots b ON b.user_id = cm.user_id
WHERE b.id = $1
"""


async def update_bot(ctx: Context, action: UpdateBot) -> Bot:
    name = None
    if action.name is not None:
        name = clean_text(action.name, "name", min_len=1, max_len=MAX_USER_NAME_CHARS)
    url = action.webhook_url
    if url:
        url = await check_webhook_url(url, ctx.node.settings.outbound_allow_private)
    for _ in range(5):
        async with ctx.node.pool.acquire() as conn, conn.transaction():
            row = await _owned_bot(conn, ctx, action.bot_id)
            recount = url is not None and (row["webhook_url"] is None) != (not url)
            chat_ids: list[int] = []
            if recount:
                # The webhook comes or goes: the bot's chats' `hooks` are recounted. Lock
                # order: its chats in id order (as the MessageWriter and membership
                # changes lock them), then its row (which the membership trigger reads
                # FOR SHARE), so no cycle with either.
                chat_ids = await conn.fetchval(_BOT_CHATS, action.bot_id)
                await conn.execute(
                    "SELECT 1 FROM chats WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
                    chat_ids,
                )
            row = await _owned_bot(conn, ctx, action.bot_id, lock=True)
            if recount and await conn.fetchval(_BOT_CHATS, action.bot_id) != chat_ids:
                continue  # it joined or left a chat meanwhile: again, with that one locked
            await _apply_update(conn, row, action, name, url)
            if recount:
                await conn.execute(_RECOUNT_HOOKS, chat_ids)
            return bot_from_row(await _owned_bot(conn, ctx, action.bot_id))
    raise ChatError(UNAVAILABLE, "the bot's chats kept changing; retry", 503)


async def _apply_update(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    action: UpdateBot,
    name: str | None,
    url: str | None,
) -> None:
    if name is not None:
        await conn.execute("UPDATE users SET name = $2 WHERE id = $1", row["user_id"], name)
    secret = row["webhook_secret"]
    new_url = row["webhook_url"] if url is None else (url or None)
    if new_url is None:
        secret = None
    elif secret is None or action.rotate_secret:
        secret = secrets.token_urlsafe(32)
    await conn.execute(
        "UPDATE bots SET webhook_url = $2, webhook_secret = $3 WHERE id = $1",
        action.bot_id,
        new_url,
        secret,
    )


async def delete_bot(ctx: Context, action: DeleteBot) -> None:
    """The bot's account is deleted as DELETE /me deletes one (it leaves its groups, its
    tokens stop, its sockets close); its username is free again."""
    from chatd.handlers.accounts import delete_account  # accounts deletes owners' bots too

    row = await _owned_bot(ctx.node.pool, ctx, action.bot_id)
    await delete_account(ctx.node, row["user_id"])


# --- tokens --------------------------------------------------------------------------------

_TOKEN_COLUMNS = """
t.id, t.name, t.scopes, s.created_at, t.expires_at, s.last_seen_at
"""


def _token_info(row: asyncpg.Record) -> TokenInfo:
    return TokenInfo(
        id=str(row["id"]),
        name=row["name"],
        scopes=list(row["scopes"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_seen_at"],
    )


async def issue_token(
    conn: asyncpg.Connection,
    ctx: Context,
    user_id: uuid.UUID,
    kind: str,
    name: str,
    expires_in: int | None,
    scopes: tuple[str, ...] = (tokens.READ, tokens.WRITE),
) -> NewToken:
    """A new token of `user_id` (a session of kind `kind`), in the caller's transaction."""
    limit = MAX_TOKENS_PER_BOT if kind == "bot" else MAX_TOKENS_PER_USER
    live = await conn.fetchval(
        "SELECT count(*) FROM sessions WHERE user_id = $1 AND kind = $2 AND revoked_at IS NULL",
        user_id,
        kind,
    )
    if live >= limit:
        raise ChatError(FORBIDDEN, f"at most {limit} tokens; revoke one first")
    token = tokens.new_token(kind)
    session_id = uuid.uuid4()
    expires_at = None
    if expires_in is not None:
        expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
    await conn.execute(
        "INSERT INTO sessions (id, user_id, device, ip, kind) VALUES ($1, $2, $3, $4, $5)",
        session_id,
        user_id,
        name,
        ctx.peer[:64],
        kind,
    )
    await conn.execute(
        "INSERT INTO api_tokens (id, user_id, name, scopes, token_hash, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        session_id,
        user_id,
        name,
        sorted(set(scopes)),
        tokens.digest(token),
        expires_at,
    )
    row = await conn.fetchrow(
        f"SELECT {_TOKEN_COLUMNS} FROM api_tokens t JOIN sessions s ON s.id = t.id WHERE t.id = $1",
        session_id,
    )
    info = _token_info(row)
    return NewToken(**msgspec.structs.asdict(info), token=token)


async def _tokens_of(ctx: Context, user_id: uuid.UUID, kind: str) -> TokenList:
    rows = await ctx.node.pool.fetch(
        f"SELECT {_TOKEN_COLUMNS} FROM api_tokens t JOIN sessions s ON s.id = t.id"
        " WHERE t.user_id = $1 AND s.kind = $2 AND s.revoked_at IS NULL"
        " ORDER BY s.created_at, t.id",
        user_id,
        kind,
    )
    return TokenList([_token_info(r) for r in rows])


async def _revoke(ctx: Context, user_id: uuid.UUID, kind: str, token_id: str) -> None:
    try:
        session_id = uuid.UUID(token_id)
    except ValueError:
        raise ChatError(NOT_FOUND, "no such token") from None
    revoked = await ctx.node.pool.fetchval(
        "UPDATE sessions SET revoked_at = now()"
        " WHERE id = $1 AND user_id = $2 AND kind = $3 AND revoked_at IS NULL RETURNING id",
        session_id,
        user_id,
        kind,
    )
    if revoked is None:
        raise ChatError(NOT_FOUND, "no such token")
    await ctx.node.revoke(Revocation(user_id, (session_id,)))


def _token_name(name: str) -> str:
    return clean_text(name, "name", min_len=1, max_len=MAX_DEVICE_CHARS)


async def create_bot_token(ctx: Context, action: CreateBotToken) -> NewToken:
    name = _token_name(action.name)
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        row = await _owned_bot(conn, ctx, action.bot_id, lock=True)
        return await issue_token(conn, ctx, row["user_id"], "bot", name, None)


async def list_bot_tokens(ctx: Context, action: ListBotTokens) -> TokenList:
    row = await _owned_bot(ctx.node.pool, ctx, action.bot_id)
    return await _tokens_of(ctx, row["user_id"], "bot")


async def revoke_bot_token(ctx: Context, action: RevokeBotToken) -> None:
    row = await _owned_bot(ctx.node.pool, ctx, action.bot_id)
    await _revoke(ctx, row["user_id"], "bot", action.token_id)


async def create_token(ctx: Context, action: CreateToken) -> NewToken:
    name = _token_name(action.name)
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", ctx.user_id)
        return await issue_token(
            conn, ctx, ctx.user_id, "pat", name, action.expires_in, tuple(action.scopes)
        )


async def list_tokens(ctx: Context, action: ListTokens) -> TokenList:
    return await _tokens_of(ctx, ctx.user_id, "pat")


async def revoke_token(ctx: Context, action: RevokeToken) -> None:
    await _revoke(ctx, ctx.user_id, "pat", action.token_id)


# --- commands ------------------------------------------------------------------------------


async def _commanded_bot(ctx: Context, bot_id: int) -> asyncpg.Record:
    """The bot, for its owner or the bot itself."""
    row = await ctx.node.pool.fetchrow(
        "SELECT user_id, commands FROM bots WHERE id = $1 AND (owner_id = $2 OR user_id = $2)",
        bot_id,
        ctx.user_id,
    )
    if row is None:
        raise no_such_bot()
    return row


async def set_commands(ctx: Context, action: SetCommands) -> CommandList:
    names = [c.name for c in action.commands]
    if len(set(names)) != len(names):
        raise ChatError(INVALID, "commands: each name once")
    await _commanded_bot(ctx, action.bot_id)
    await ctx.node.pool.execute(
        "UPDATE bots SET commands = $2::jsonb WHERE id = $1",
        action.bot_id,
        msgspec.json.encode(action.commands).decode(),
    )
    return CommandList(action.commands)


async def get_commands(ctx: Context, action: GetCommands) -> CommandList:
    row = await _commanded_bot(ctx, action.bot_id)
    return CommandList(_commands_decoder.decode(row["commands"]))


_CHAT_COMMANDS = """
SELECT b.user_id, b.username, b.commands
FROM chat_members cm JOIN bots b ON b.user_id = cm.user_id
WHERE cm.chat_id = $1
  AND EXISTS (SELECT 1 FROM chat_members me WHERE me.chat_id = $1 AND me.user_id = $2)
"""


async def chat_commands(ctx: Context, action: ChatCommands) -> ChatCommandList:
    async with ctx.node.pool.acquire() as conn:
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM chat_members WHERE chat_id = $1 AND user_id = $2)",
            action.chat_id,
            ctx.user_id,
        ):
            raise no_such_chat()
        rows = await conn.fetch(_CHAT_COMMANDS, action.chat_id, ctx.user_id)
    found = [
        ChatCommand(c.name, c.description, str(r["user_id"]), r["username"])
        for r in rows
        for c in _commands_decoder.decode(r["commands"])
    ]
    found.sort(key=lambda c: (c.name, c.bot_username))
    return ChatCommandList(found)


# --- webhook URLs ----------------------------------------------------------------------------


async def check_webhook_url(url: str, allow_private: bool) -> str:
    """The URL when chatd may POST to it (deliveries.url_problem: http(s), and unless
    CHATD_OUTBOUND_ALLOW_PRIVATE no private, loopback or otherwise non-global address,
    SSRF); checked again before each delivery, as a name may resolve elsewhere later."""
    problem = await url_problem(url, allow_private)
    if problem is not None:
        raise ChatError(INVALID, f"webhook_url: {problem}")
    return url
