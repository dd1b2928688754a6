"""The dispatcher: each client action maps to one plain async handler `(ctx, action) -> data`.

A handler raises ChatError for anything the client got wrong, and tells other sockets
about changes only after its transaction has committed. The returned data is the ack.

    chats.py     create_chat, list_chats, get_chat
    messages.py  send_message, get_message, sync
    reads.py     mark_read and read receipts
    groups.py    add_members, remove_member, leave_chat, rename_chat, set_role, delete_chat
    presence.py  typing
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from chatd.handlers import chats, groups, messages, presence, reads
from chatd.handlers.base import Context
from chatd.protocol import (
    AddMembers,
    CreateChat,
    DeleteChat,
    GetChat,
    GetMessage,
    LeaveChat,
    ListChats,
    MarkRead,
    RemoveMember,
    RenameChat,
    SendMessage,
    SetRole,
    Sync,
    Typing,
)

Handler = Callable[[Context, Any], Awaitable[Any]]

HANDLERS: dict[type, Handler] = {
    CreateChat: chats.create_chat,
    ListChats: chats.list_chats,
    GetChat: chats.get_chat,
    SendMessage: messages.send_message,
    GetMessage: messages.get_message,
    Sync: messages.sync,
    MarkRead: reads.mark_read,
    Typing: presence.typing,
    AddMembers: groups.add_members,
    RemoveMember: groups.remove_member,
    LeaveChat: groups.leave_chat,
    RenameChat: groups.rename_chat,
    SetRole: groups.set_role,
    DeleteChat: groups.delete_chat,
}


async def dispatch(ctx: Context, action: Any) -> Any:
    return await HANDLERS[type(action)](ctx, action)
