"""Administration: `chatd admin`, the /admin API, reports, moderation and the audit log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from chatd.client import Api, ChatdError, TokenRefused
from tests.conftest import PASSWORD, ROOT, TEST_SECRET, Server, UserFactory


def chatd_admin(database_url: str, workdir: Path, *args: str, stdin: str = "") -> list[dict]:
    """Run `chatd admin ...` as an operator would; its JSON lines."""
    env = {
        **os.environ,
        "CHATD_DATABASE_URL": database_url,
        "CHATD_SECRET": TEST_SECRET,
        "CHATD_DATA_DIR": str(workdir),
    }
    result = subprocess.run(
        [sys.executable, "-m", "chatd", "admin", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def make_admin(server: Server, database_url: str, tmp_path: Path) -> Api:
    email = f"admin-{uuid.uuid4().hex[:10]}@example.com"
    [made] = await asyncio.to_thread(
        chatd_admin,
        database_url,
        tmp_path,
        "create-user",
        email,
        "--name",
        "Admin",
        "--admin",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert made["role"] == "admin" and made["email"] == email
    api = Api(server.base_url)
    await api.login(email, PASSWORD)
    api.email = email  # type: ignore[attr-defined]
    return api


async def test_only_admins_reach_the_admin_api(
    server: Server, database_url: str, tmp_path: Path, make_user: UserFactory
) -> None:
    admin, alice = await make_admin(server, database_url, tmp_path), await make_user("Alice")
    stats = await admin.call("GET", "/admin/stats")
    assert stats["admins"] >= 1 and stats["users"] >= 2
    with pytest.raises(ChatdError) as caught:
        await alice.call("GET", "/admin/stats")
    assert (caught.value.status, caught.value.code) == (403, "forbidden")
    # Promoted, Alice has the API; demoted, she loses it at once.
    await admin.call("PATCH", f"/admin/users/{alice.user_uuid}", json={"role": "admin"})
    assert (await alice.call("GET", "/admin/stats"))["admins"] >= 2
    await admin.call("PATCH", f"/admin/users/{alice.user_uuid}", json={"role": "user"})
    with pytest.raises(ChatdError):
        await alice.call("GET", "/admin/stats")
    # Nobody demotes, disables or deletes themselves over REST.
    for method, body in (
        ("PATCH", {"role": "user"}),
        ("PATCH", {"disabled": True}),
        ("DELETE", None),
    ):
        with pytest.raises(ChatdError) as caught:
            await admin.call(method, f"/admin/users/{admin.user_uuid}", json=body)
        assert caught.value.status == 403
    audit = (await admin.call("GET", "/admin/audit"))["entries"]
    assert [(e["action"], e["target"], e["actor_uuid"]) for e in audit[:2]] == [
        ("demote", alice.user_uuid, admin.user_uuid),
        ("promote", alice.user_uuid, admin.user_uuid),
    ]


async def test_disabling_closes_sockets_and_refuses_tokens_and_logins(
    server: Server, database_url: str, tmp_path: Path, make_user: UserFactory
) -> None:
    admin, bob = await make_admin(server, database_url, tmp_path), await make_user("Bob")
    async with await bob.connect() as sock:
        user = await admin.call("PATCH", f"/admin/users/{bob.user_uuid}", json={"disabled": True})
        assert user["disabled"] is True
        assert await sock.wait_closed() == 1008
    with pytest.raises(ChatdError) as caught:
        await bob.me()
    assert caught.value.status == 401
    with pytest.raises(ChatdError) as caught:
        await bob.refresh()
    assert caught.value.status == 401
    with pytest.raises(ChatdError) as caught:
        await Api(server.base_url).login(bob.email, PASSWORD)  # type: ignore[attr-defined]
    assert (caught.value.status, caught.value.code) == (403, "forbidden")
    await admin.call("PATCH", f"/admin/users/{bob.user_uuid}", json={"disabled": False})
    await bob.login(bob.email, PASSWORD)  # type: ignore[attr-defined]
    await bob.me()


async def test_the_command_reaches_a_running_server_without_redis(
    server: Server, database_url: str, tmp_path: Path, make_user: UserFactory
) -> None:
    carol = await make_user("Carol")
    await carol.me()  # the server knows her session as live, in memory
    async with await carol.connect() as sock:
        [disabled] = await asyncio.to_thread(
            chatd_admin,
            database_url,
            tmp_path,
            "disable",
            carol.email,  # type: ignore[attr-defined]
        )
        assert disabled["disabled"] is True
        assert await sock.wait_closed() == 1008  # told through PostgreSQL
    with pytest.raises(ChatdError):
        await carol.me()
    with pytest.raises(TokenRefused):
        await carol.connect()
    listed = await asyncio.to_thread(chatd_admin, database_url, tmp_path, "list", "--q", "carol")
    assert carol.user_uuid in [u["user_uuid"] for u in listed]
    [stats] = await asyncio.to_thread(chatd_admin, database_url, tmp_path, "stats")
    assert stats["disabled"] >= 1
    await asyncio.to_thread(chatd_admin, database_url, tmp_path, "enable", carol.user_uuid or "")
    await asyncio.to_thread(
        chatd_admin,
        database_url,
        tmp_path,
        "set-password",
        carol.email,  # type: ignore[attr-defined]
        "--password-stdin",
        stdin="a brand new password\n",
    )
    await carol.login(carol.email, "a brand new password")  # type: ignore[attr-defined]
    await asyncio.to_thread(chatd_admin, database_url, tmp_path, "delete", carol.email)  # type: ignore[attr-defined]
    with pytest.raises(ChatdError):
        await carol.me()


async def test_reports_reach_admins_who_moderate(
    server: Server, database_url: str, tmp_path: Path, make_user: UserFactory
) -> None:
    admin = await make_admin(server, database_url, tmp_path)
    alice, bob, eve = await make_user("Alice"), await make_user("Bob"), await make_user("Eve")
    group = await alice.call(
        "POST", "/chats", json={"type": "group", "name": "G", "user_ids": [bob.user_uuid]}
    )
    rude = await alice.call("POST", f"/chats/{group['id']}/messages", json={"text": "rude"})
    async with await bob.connect() as sock:
        report = await sock.request("report_message", message_id=rude["id"], reason=" spam ")
        assert (report["message_id"], report["reason"]) == (rude["id"], "spam")
        again = await bob.call("POST", f"/messages/{rude['id']}/report", json={"reason": "twice"})
        assert again == report  # once per message and reporter
        with pytest.raises(ChatdError) as caught:  # not her chat: as if there were no message
            await eve.call("POST", f"/messages/{rude['id']}/report", json={"reason": "x"})
        assert caught.value.status == 404

        reports = (await admin.call("GET", "/admin/reports"))["reports"]
        assert reports[0]["report"] == report
        assert reports[0]["message"]["text"] == "rude"

        deleted = await admin.call("DELETE", f"/admin/messages/{rude['id']}")
        assert deleted == {"chat_id": group["id"], "message_id": rude["id"], "for_everyone": True}
        tombstone = (await sock.next_event("message_updated"))["data"]
        assert (tombstone["id"], tombstone["deleted"], tombstone["text"]) == (rude["id"], True, "")
    audit = (await admin.call("GET", "/admin/audit"))["entries"]
    assert (audit[0]["action"], audit[0]["target"], audit[0]["details"]) == (
        "delete_message",
        str(rude["id"]),
        {"chat_id": group["id"]},
    )
    with pytest.raises(ChatdError) as caught:
        await admin.call("DELETE", f"/admin/messages/{2**62}")
    assert caught.value.status == 404


async def test_admins_create_and_delete_accounts(
    server: Server, database_url: str, tmp_path: Path
) -> None:
    admin = await make_admin(server, database_url, tmp_path)
    email = f"made-{uuid.uuid4().hex[:8]}@example.com"
    body = {"name": "Made", "email": email, "password": PASSWORD}
    made = await admin.call("POST", "/admin/users", json=body)
    assert (made["role"], made["disabled"], made["deleted"]) == ("user", False, False)
    with pytest.raises(ChatdError) as caught:
        await admin.call("POST", "/admin/users", json=body)
    assert caught.value.status == 409
    user = Api(server.base_url)
    await user.login(email, PASSWORD)
    await admin.call("DELETE", f"/admin/users/{made['user_uuid']}")
    with pytest.raises(ChatdError):
        await user.me()
    gone = {"q": f"deleted-{made['user_uuid']}"}  # the placeholder address it now has
    listed = (await admin.call("GET", "/admin/users", params=gone))["users"]
    assert [u["deleted"] for u in listed if u["user_uuid"] == made["user_uuid"]] == [True]
