"""How REST reads a request into its request Struct (chatd/rest.py's route rows): query
values as Python reads them, `null` never a value, the OpenAPI names clients are generated
from kept stable, and register's checks in their order."""

from __future__ import annotations

import httpx
import pytest

from chatd import rest
from chatd.client import Api
from chatd.openapi import openapi_document
from tests.conftest import PASSWORD


def auth(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.access_token}"}


async def group_with_message(api: Api) -> tuple[int, int]:
    chat = await api.call("POST", "/chats", json={"type": "group", "name": "q", "user_ids": []})
    message = await api.call("POST", f"/chats/{chat['id']}/messages", json={"text": "hi"})
    return chat["id"], message["id"]


@pytest.mark.parametrize(
    "path",
    [
        "/chats?before=null",
        "/chats?limit=null",
        "/users_list?after=null",
        "/users_list?after=nope",
        "/chats?limit=50.0",
        "/chats?limit=1e2",
        "/chats?limit=0",
        "/chats?limit=201",
        "/chats?before=0",
        "/users_list?q=" + "x" * 255,
        "/users_list?q=%00",
    ],
)
async def test_query_values_that_are_not_values_are_invalid(
    http: httpx.AsyncClient, alice: Api, path: str
) -> None:
    response = await http.get(path, headers=auth(alice))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid"


@pytest.mark.parametrize("limit", ["05", "+5", " 5", "5 "])
async def test_query_integers_read_as_python_reads_them(
    http: httpx.AsyncClient, alice: Api, limit: str
) -> None:
    response = await http.get("/chats", params={"limit": limit}, headers=auth(alice))
    assert response.status_code == 200, response.text


async def test_history_refuses_a_null_cursor(http: httpx.AsyncClient, alice: Api) -> None:
    chat_id, message_id = await group_with_message(alice)
    for query in ("before=null", "before=", "limit=null&before=1"):
        response = await http.get(f"/history/{chat_id}?{query}", headers=auth(alice))
        assert response.status_code == 422, (query, response.text)
    page = await http.get(f"/history/{chat_id}?before={message_id + 1}", headers=auth(alice))
    assert [m["id"] for m in page.json()["messages"]] == [message_id]


async def test_register_checks_name_then_email_then_password(http: httpx.AsyncClient) -> None:
    async def error(body: dict[str, str]) -> str:
        response = await http.post("/register", json=body)
        assert response.status_code == 422, response.text
        return response.json()["error"]["message"]

    ok = {"name": "Ok", "email": "order@example.com", "password": PASSWORD}
    assert "name" in await error({**ok, "name": " ", "email": "bad", "password": "short"})
    assert "email" in (await error({**ok, "email": "bad", "password": "short"})).lower()
    assert await error({**ok, "password": "short"}) == "password must be 8..128 characters"
    assert await error({**ok, "password": "x" * 129}) == "password must be 8..128 characters"


def test_operation_ids_and_schema_names_stay_as_clients_know_them() -> None:
    """Generated clients name their methods and types after these: renaming one breaks them."""
    document = openapi_document(rest.OPERATIONS)
    ids = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    assert ids == {
        "register", "login", "refresh", "me", "users_list", "history", "list_chats",
        "create_chat", "get_chat", "update_chat", "delete_chat", "add_members",
        "remove_member", "set_role", "send_message", "get_message", "mark_read",
        "healthz", "readyz", "edit_message", "delete_message", "list_edits", "react",
        "unreact", "forward_message", "pin_message", "unpin_message", "logout",
        "update_me", "change_password", "list_sessions", "revoke_session",
        "list_blocks", "block_user", "unblock_user", "delete_me", "export_me",
        "report_message", "admin_list_users", "admin_create_user", "admin_update_user",
        "admin_delete_user", "admin_stats", "admin_delete_message", "admin_list_reports",
        "admin_list_audit", "upload_file", "download_file", "download_thumbnail", "file_link",
        "search_messages", "get_user", "set_notifications", "vapid_key",
        "add_push_subscription", "remove_push_subscription",
    } | BOT_OPERATION_IDS | APP_OPERATION_IDS  # fmt: skip
    assert set(document["components"]["schemas"]) == {
        "AddMembersRequest", "Chat", "ChatMember", "ChatOverview", "ChatPage",
        "CreateChatRequest", "ErrorBody", "ErrorResponse", "Health", "History",
        "LoginRequest", "Me", "Member", "Message", "ReadRequest", "ReadUpto", "Readiness",
        "RefreshRequest", "RegisterRequest", "RegisterResponse", "UpdateChatRequest",
        "SendMessageRequest", "SetRoleRequest", "TokenPair", "UserList", "DeletedMessage",
        "Edit", "EditList", "EditMessageRequest", "ForwardMessageRequest", "ForwardedFrom",
        "PinMessageRequest", "Reaction", "ChangePasswordRequest", "SessionInfo",
        "SessionList", "UpdateMeRequest", "BlockList", "DeleteMeRequest", "Export",
        "ExportedChat", "ReportMessageRequest", "Report", "AdminCreateUserRequest",
        "AdminUpdateUserRequest", "AdminUser", "AdminUserList", "Stats", "ReportList",
        "ReportedMessage", "AuditLog", "AuditEntry", "Attachment", "Upload", "FileLink",
        "Highlight", "SearchHit", "SearchResults", "NotificationSettings",
        "SetNotificationsRequest", "Presence", "UserProfile", "PushKeys",
        "PushSubscriptionInfo", "AddPushSubscriptionRequest", "RemovePushSubscriptionRequest",
        "VapidKey",
    } | BOT_SCHEMAS | APP_SCHEMAS  # fmt: skip


# Bots and integrations (issue 16), kept apart so other additions merge beside them.
BOT_OPERATION_IDS = {
    "create_bot", "list_bots", "get_bot", "update_bot", "delete_bot", "create_bot_token",
    "list_bot_tokens", "revoke_bot_token", "set_commands", "get_commands", "chat_commands",
    "create_token", "list_tokens", "revoke_token", "list_deliveries", "create_webhook",
    "list_webhooks", "delete_webhook", "post_hook",
}  # fmt: skip
BOT_SCHEMAS = {
    "Bot", "BotCommand", "BotCreated", "BotList", "ChatCommand", "ChatCommandList",
    "CommandList", "CreateBotRequest", "CreateBotTokenRequest", "CreateTokenRequest",
    "NewToken", "SetCommandsRequest", "TokenInfo", "TokenList", "UpdateBotRequest",
    "CreateWebhookRequest", "DeliveryInfo", "DeliveryList", "PostHookRequest", "Webhook",
    "WebhookList",
}  # fmt: skip


# The app API (issue 19, chatd/handlers/app.py).
APP_OPERATION_IDS = {
    "create_api_key", "list_api_keys", "revoke_api_key", "upsert_users", "deactivate_users",
    "app_create_chat", "app_get_chat", "app_add_members", "app_remove_members",
    "app_post_message", "app_get_messages",
}  # fmt: skip
APP_SCHEMAS = {
    "ApiKeyCreated", "ApiKeyInfo", "ApiKeyList", "AppChat", "AppUser", "UpsertedUser",
    "UpsertedUsers", "CreateApiKeyRequest", "UpsertUsersRequest", "DeactivateUsersRequest",
    "AppCreateChatRequest", "AppAddMembersRequest", "AppRemoveMembersRequest",
    "AppPostMessageRequest",
}  # fmt: skip


def test_a_route_row_naming_a_field_its_request_lacks_fails_at_import() -> None:
    with pytest.raises(RuntimeError, match="has no field"):
        rest.route("GET", "/chats/{id:int}", rest.GetChat, "s", None, tag="chats")


def test_a_generated_body_keeps_defaults_factories_and_renames() -> None:
    import msgspec

    class Probe(msgspec.Struct, kw_only=True):
        chat_id: int
        tags: list[str] = msgspec.field(default_factory=list)
        wire_name: int = msgspec.field(default=1, name="wireName")

    body = rest.RequestShape.of("POST", "/x/{chat_id:int}", Probe, {}).body
    assert body is not None
    assert msgspec.json.decode(b"{}", type=body) == body(tags=[], wire_name=1)
    assert msgspec.json.decode(b'{"wireName": 5}', type=body).wire_name == 5
