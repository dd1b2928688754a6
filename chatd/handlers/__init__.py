"""The handlers: each request maps to one plain async function `(ctx, request) -> reply`.

A handler runs its own SQL, raises ChatError for anything the client got wrong, and tells
other sockets about changes only after its transaction has committed. What it returns is
the socket's ack data, or the REST body (a `Created` is answered 201, or 200 when found).

    chats.py     create_chat, list_chats, get_chat, set_notifications
    messages.py  send_message, get_message, sync, and the unread snapshot
    changes.py   edit_message, delete_message, react, unreact, forward_message,
                 pin_message, unpin_message, and a message's earlier texts
    reads.py     mark_read (and POST /chats/{id}/read)
    groups.py    add_members, remove_member, leave_chat, rename_chat, update_chat, set_role,
                 delete_chat
    presence.py  typing, get_presence, and get_user (REST only)
    accounts.py  register, login, refresh, logout, me, update_me, change_password,
                 list_sessions, revoke_session, delete_me, export_me, users_list
                 (REST only)
    history.py   history (REST only)
    search.py    search_messages (full text, newest first, highlight offsets)
    blocks.py    block_user, unblock_user, list_blocks (REST only)
    admin.py     report_message; the /admin API (REST only): users, stats, moderation,
                 reports, the audit log
    push.py      Web Push subscriptions and the VAPID key (REST only)
    files.py     uploads recorded, who may download, signed links, attachments claimed
                 (the bytes: chatd/rest_files.py)
    bots.py      bots, their tokens and commands; personal access tokens (REST only)
    webhooks.py  bots' webhook deliveries (the sender, the owner's list); chats'
                 incoming webhooks (REST only)
    app.py       API keys (admins) and the app API under /app (API keys only)

Adding a request: its Struct in chatd/protocol.py, its handler here, and its route in
chatd/rest.py (or its Struct in SOCKET_ONLY).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from chatd.handlers import (
    accounts,
    admin,
    app,
    blocks,
    bots,
    changes,
    chats,
    files,
    groups,
    history,
    messages,
    presence,
    push,
    reads,
    search,
    webhooks,
)
from chatd.handlers.base import Context
from chatd.protocol import (
    FORBIDDEN,
    INSUFFICIENT_SCOPE,
    LOGIN_REQUIRED,
    AddMembers,
    AddPushSubscription,
    AdminCreateUser,
    AdminDeleteMessage,
    AdminDeleteUser,
    AdminListAudit,
    AdminListReports,
    AdminListUsers,
    AdminStats,
    AdminUpdateUser,
    AppAddMembers,
    AppCreateChat,
    AppGetChat,
    AppGetMessages,
    AppPostMessage,
    AppRemoveMembers,
    BlockUser,
    ChangePassword,
    ChatCommands,
    ChatError,
    ClientAction,
    CreateApiKey,
    CreateBot,
    CreateBotToken,
    CreateChat,
    Created,
    CreateToken,
    CreateWebhook,
    DeactivateUsers,
    DeleteBot,
    DeleteChat,
    DeleteMe,
    DeleteMessage,
    DeleteWebhook,
    EditMessage,
    ExportMe,
    ForwardMessage,
    GetBot,
    GetChat,
    GetCommands,
    GetEdits,
    GetFileLink,
    GetHistory,
    GetMe,
    GetMessage,
    GetPresence,
    GetUser,
    GetVapidKey,
    LeaveChat,
    ListApiKeys,
    ListBlocks,
    ListBots,
    ListBotTokens,
    ListChats,
    ListDeliveries,
    ListSessions,
    ListTokens,
    ListUsers,
    ListWebhooks,
    Login,
    Logout,
    MarkRead,
    PinMessage,
    PostHook,
    React,
    Read,
    Refresh,
    Register,
    RemoveMember,
    RemovePushSubscription,
    RenameChat,
    ReportMessage,
    RevokeApiKey,
    RevokeBotToken,
    RevokeSession,
    RevokeToken,
    SearchMessages,
    SendMessage,
    SetCommands,
    SetNotifications,
    SetRole,
    Sync,
    Typing,
    UnblockUser,
    UnpinMessage,
    Unreact,
    UpdateBot,
    UpdateChat,
    UpdateMe,
    UpsertUsers,
)

Handler = Callable[[Context, Any], Awaitable[Any]]

# The socket's actions (the ClientAction union), each with its handler.
HANDLERS: dict[type, Handler] = {
    CreateChat: chats.create_chat,
    ListChats: chats.list_chats,
    GetChat: chats.get_chat,
    SendMessage: messages.send_message,
    GetMessage: messages.get_message,
    EditMessage: changes.edit_message,
    DeleteMessage: changes.delete_message,
    React: changes.react,
    Unreact: changes.unreact,
    ForwardMessage: changes.forward_message,
    PinMessage: changes.pin_message,
    UnpinMessage: changes.unpin_message,
    Sync: messages.sync,
    MarkRead: reads.mark_read,
    Typing: presence.typing,
    AddMembers: groups.add_members,
    RemoveMember: groups.remove_member,
    LeaveChat: groups.leave_chat,
    RenameChat: groups.rename_chat,
    UpdateChat: groups.update_chat,
    SetRole: groups.set_role,
    DeleteChat: groups.delete_chat,
    BlockUser: blocks.block_user,
    UnblockUser: blocks.unblock_user,
    ReportMessage: admin.report_message,
    SearchMessages: search.search_messages,
    GetPresence: presence.get_presence,
    SetNotifications: chats.set_notifications,
}

# Requests only REST has: no socket action carries them.
REST_HANDLERS: dict[type, Handler] = {
    Register: accounts.register,
    Login: accounts.login,
    Refresh: accounts.refresh,
    Logout: accounts.logout,
    GetMe: accounts.me,
    UpdateMe: accounts.update_me,
    ChangePassword: accounts.change_password,
    ListSessions: accounts.list_sessions,
    RevokeSession: accounts.revoke_session,
    DeleteMe: accounts.delete_me,
    ExportMe: accounts.export_me,
    ListBlocks: blocks.list_blocks,
    AdminListUsers: admin.admin_list_users,
    AdminCreateUser: admin.admin_create_user,
    AdminUpdateUser: admin.admin_update_user,
    AdminDeleteUser: admin.admin_delete_user,
    AdminStats: admin.admin_stats,
    AdminDeleteMessage: admin.admin_delete_message,
    AdminListReports: admin.admin_list_reports,
    AdminListAudit: admin.admin_list_audit,
    ListUsers: accounts.users_list,
    GetHistory: history.history,
    GetEdits: changes.list_edits,
    Read: reads.read_chat,
    GetFileLink: files.file_link,
    CreateBot: bots.create_bot,
    ListBots: bots.list_bots,
    GetBot: bots.get_bot,
    UpdateBot: bots.update_bot,
    DeleteBot: bots.delete_bot,
    CreateBotToken: bots.create_bot_token,
    ListBotTokens: bots.list_bot_tokens,
    RevokeBotToken: bots.revoke_bot_token,
    SetCommands: bots.set_commands,
    GetCommands: bots.get_commands,
    ChatCommands: bots.chat_commands,
    CreateToken: bots.create_token,
    ListTokens: bots.list_tokens,
    RevokeToken: bots.revoke_token,
    ListDeliveries: webhooks.list_deliveries,
    CreateWebhook: webhooks.create_webhook,
    ListWebhooks: webhooks.list_webhooks,
    DeleteWebhook: webhooks.delete_webhook,
    PostHook: webhooks.post_hook,
    GetUser: presence.get_user,
    AddPushSubscription: push.add_push_subscription,
    RemovePushSubscription: push.remove_push_subscription,
    GetVapidKey: push.vapid_key,
    CreateApiKey: app.create_api_key,
    ListApiKeys: app.list_api_keys,
    RevokeApiKey: app.revoke_api_key,
    UpsertUsers: app.upsert_users,
    DeactivateUsers: app.deactivate_users,
    AppCreateChat: app.app_create_chat,
    AppGetChat: app.app_get_chat,
    AppAddMembers: app.app_add_members,
    AppRemoveMembers: app.app_remove_members,
    AppPostMessage: app.app_post_message,
    AppGetMessages: app.app_get_messages,
}

# Actions REST has no route for, and why: sync and typing only make sense on a live
# socket; mark_read's REST form is POST /chats/{id}/read (Read); leave_chat's is
# DELETE /chats/{id}/members/{your own uuid}; get_presence's is GET /users/{uuid}, one user
# at a time (a list in a query string has no place in the route table).
# RenameChat: PATCH /chats/{id} is UpdateChat, of which renaming is a part.
SOCKET_ONLY = frozenset({Sync, Typing, MarkRead, LeaveChat, RenameChat, GetPresence})

_missing = set(ClientAction.__args__) ^ set(HANDLERS)
if _missing:
    raise RuntimeError(f"actions and handlers differ: {sorted(c.__name__ for c in _missing)}")


# --- what API tokens may do (bots' tokens and personal access tokens) -----------------------

# Requests that change nothing: a token with the `read` scope alone may make them. Every
# other request is a change and needs `write` (socket actions and REST alike; `typing` and
# marking read too: others see them).
READS: frozenset[type] = frozenset(
    {
        ListChats,
        GetChat,
        GetMessage,
        Sync,
        GetMe,
        ExportMe,
        ListBlocks,
        ListUsers,
        GetHistory,
        GetEdits,
        GetFileLink,
        AdminListUsers,
        AdminStats,
        AdminListReports,
        AdminListAudit,
        GetCommands,
        ChatCommands,
        ListDeliveries,
        ListWebhooks,
        SearchMessages,
        GetPresence,
        GetUser,
        GetVapidKey,
    }
)

# Requests only a login may make, never an API token: the account's credentials (password,
# sessions, tokens), the account itself, and bots (whose tokens a leaked token would
# otherwise mint, or whose webhook it would point elsewhere), and incoming webhooks (a
# credential that would outlive the token). Whoever holds a token
# cannot make it outlive its revocation, nor lock the owner out.
LOGIN_ONLY: frozenset[type] = frozenset(
    {
        Logout,
        ChangePassword,
        ListSessions,
        RevokeSession,
        DeleteMe,
        CreateToken,
        ListTokens,
        RevokeToken,
        CreateBot,
        ListBots,
        GetBot,
        UpdateBot,
        DeleteBot,
        CreateBotToken,
        ListBotTokens,
        RevokeBotToken,
        CreateWebhook,
        CreateApiKey,
        ListApiKeys,
        RevokeApiKey,
    }
)

# What a bot may not do beside LOGIN_ONLY: open chats (members add bots to theirs).
BOTS_REFUSED: frozenset[type] = frozenset({CreateChat})


# The app API (handlers/app.py): the only requests an API key (kind "app") may make, and
# only it; each handler checks the key's scope for it.
APP_REQUESTS: frozenset[type] = frozenset(
    {
        UpsertUsers,
        DeactivateUsers,
        AppCreateChat,
        AppGetChat,
        AppAddMembers,
        AppRemoveMembers,
        AppPostMessage,
        AppGetMessages,
    }
)


def authorize(ctx: Context, request_type: type) -> None:
    """Refuse a request the caller's credential does not allow: `login_required` for an API
    token on LOGIN_ONLY; `forbidden` for a bot on
    BOTS_REFUSED, for an API key outside the app API and for anyone else in it;
    `insufficient_scope` for a change with a read-only token. A login (or the app's token)
    may make any other request (its handler decides)."""
    if (ctx.kind == "app") != (request_type in APP_REQUESTS):
        raise ChatError(
            FORBIDDEN,
            "an API key reaches the app API only"
            if ctx.kind == "app"
            else "the app API needs an API key (POST /admin/api_keys)",
        )
    # The app's token (external identity) is its user's login, from the app's sign-in;
    # only logout, which needs a chatd session, refuses it (handlers/accounts.py).
    if ctx.kind in ("login", "app", "external"):
        return
    if request_type in LOGIN_ONLY:
        raise ChatError(LOGIN_REQUIRED, "this needs a login session, not an API token")
    if ctx.is_bot and request_type in BOTS_REFUSED:
        raise ChatError(FORBIDDEN, "bots cannot do this; a member adds the bot to a chat")
    if request_type not in READS:
        require_write(ctx)


def require_write(ctx: Context) -> None:
    """`insufficient_scope` unless the caller may change things (the routes of
    chatd/rest_files.py have no request Struct: an upload is a change, a download not)."""
    if "write" not in ctx.scopes:
        raise ChatError(INSUFFICIENT_SCOPE, "this token has the read scope only")


def handler_for(request_type: type) -> Handler:
    """The handler of a socket action or a REST-only request."""
    return HANDLERS.get(request_type) or REST_HANDLERS[request_type]


async def dispatch(ctx: Context, action: ClientAction) -> Any:
    """Run a socket action; return its ack data."""
    authorize(ctx, type(action))
    result = await HANDLERS[type(action)](ctx, action)
    return result.value if isinstance(result, Created) else result
