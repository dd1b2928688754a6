"""Sessions: every login is one; listing, revoking, logout, password change, PATCH /me.

A revoked session's access token is refused on its next request, its refresh token is
refused, and its sockets close with 1008. (Across nodes: tests/test_cluster.py.)
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest

from chatd import auth
from chatd.client import Api, ChatdError, TokenRefused
from chatd.hub import SESSION_REVOKED_REASON
from tests.conftest import PASSWORD, Server, UserFactory

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


async def second_login(api: Api, **body: str) -> Api:
    """Another session of the same user (a second device)."""
    other = Api(api.base_url)
    other.http.headers.update(body.pop("headers", {}))  # type: ignore[arg-type]
    tokens = await other.call(
        "POST", "/login", json={"email": api.email, "password": PASSWORD, **body}
    )
    other._keep(tokens)
    other.user_uuid = api.user_uuid
    other.email = api.email  # type: ignore[attr-defined]
    return other


async def refused(api: Api) -> ChatdError:
    with pytest.raises(ChatdError) as caught:
        await api.me()
    assert caught.value.status == 401 and caught.value.code == "unauthorized"
    return caught.value


async def test_each_login_is_a_session_named_by_its_device(make_user: UserFactory) -> None:
    alice = await make_user("Alice")
    phone = await second_login(alice, device="  Alice's phone ")
    browser = await second_login(alice, headers={"User-Agent": FIREFOX})
    sessions = await browser.sessions()
    assert [s["device"] for s in sessions[:2]] == ["Firefox on Linux", "Alice's phone"]
    assert sessions[2]["device"].startswith("python-httpx/")  # the User-Agent's product
    assert [s["current"] for s in sessions] == [True, False, False]
    for session in sessions:
        assert uuid.UUID(session["id"]) and session["ip"] == "127.0.0.1"
        assert session["created_at"] <= session["last_seen_at"]
    assert [s["device"] for s in await phone.sessions() if s["current"]] == ["Alice's phone"]
    await phone.aclose()
    await browser.aclose()


async def test_a_long_device_name_is_refused(make_user: UserFactory) -> None:
    alice = await make_user("Alice")
    with pytest.raises(ChatdError) as caught:
        await second_login(alice, device="x" * 101)
    assert caught.value.status == 422


async def test_a_known_session_costs_no_query_per_request(make_user: UserFactory) -> None:
    # The first check in a process stamps last_seen_at; later checks come from memory.
    alice = await make_user("Alice")
    first = (await alice.sessions())[0]["last_seen_at"]
    for _ in range(5):
        await alice.me()
    assert (await alice.sessions())[0]["last_seen_at"] == first


async def test_revoking_a_session_refuses_its_tokens_and_closes_its_sockets(
    make_user: UserFactory,
) -> None:
    alice = await make_user("Alice")
    lost_phone = await second_login(alice, device="phone")
    await lost_phone.me()  # known live to the server from here on
    phone_socket = await lost_phone.connect()
    own_socket = await alice.connect()
    phone_id = next(s["id"] for s in await alice.sessions() if s["device"] == "phone")

    await alice.revoke_session(phone_id)

    assert await phone_socket.wait_closed() == 1008
    assert phone_socket.close_reason == SESSION_REVOKED_REASON
    await refused(lost_phone)
    with pytest.raises(ChatdError) as caught:
        await lost_phone.refresh()
    assert caught.value.status == 401
    with pytest.raises(TokenRefused):
        await lost_phone.connect()
    # The rest of the account goes on.
    assert phone_id not in [s["id"] for s in await alice.sessions()]
    assert await own_socket.request("list_chats") is not None
    assert not own_socket.closed
    # Revoked already: as unknown as a session that never was.
    with pytest.raises(ChatdError) as caught:
        await alice.revoke_session(phone_id)
    assert caught.value.status == 404
    await own_socket.close()


async def test_another_users_session_is_not_found(make_user: UserFactory) -> None:
    alice, bob = await make_user("Alice"), await make_user("Bob")
    bobs = (await bob.sessions())[0]["id"]
    for session_id in (bobs, str(uuid.uuid4()), "not-a-uuid"):
        with pytest.raises(ChatdError) as caught:
            await alice.revoke_session(session_id)
        assert (caught.value.status, caught.value.code) == (404, "not_found")
    await bob.me()  # untouched


async def test_logout_ends_this_session_only(make_user: UserFactory) -> None:
    alice = await make_user("Alice")
    other = await second_login(alice)
    socket = await alice.connect()
    token, refresh_token = alice.access_token, alice.refresh_token
    await alice.logout()
    assert await socket.wait_closed() == 1008
    alice.access_token, alice.refresh_token = token, refresh_token
    await refused(alice)
    with pytest.raises(ChatdError):
        await alice.refresh()
    assert (await other.me())["user_uuid"] == alice.user_uuid
    await other.aclose()


async def test_a_reused_refresh_token_revokes_its_session(make_user: UserFactory) -> None:
    alice = await make_user("Alice")
    stolen = alice.refresh_token
    await alice.refresh()
    await alice.me()
    thief = Api(alice.base_url)
    thief.refresh_token = stolen
    with pytest.raises(ChatdError):
        await thief.refresh()
    await refused(alice)  # the session the token came from is over, access tokens too


async def test_a_token_without_a_session_is_refused(server: Server, make_user: UserFactory) -> None:
    alice = await make_user("Alice")
    assert alice.user_uuid is not None
    alice.access_token = auth.issue_token(
        server.secret, uuid.UUID(alice.user_uuid), auth.ACCESS, 60
    )
    await refused(alice)
    alice.access_token = auth.issue_token(
        server.secret, uuid.UUID(alice.user_uuid), auth.ACCESS, 60, uuid.uuid4()
    )
    await refused(alice)


async def test_changing_the_password_signs_out_the_other_sessions(
    make_user: UserFactory,
) -> None:
    alice = await make_user("Alice")
    other = await second_login(alice)
    await other.me()
    other_socket = await other.connect()

    with pytest.raises(ChatdError) as caught:
        await alice.change_password("wrong password", "a new password")
    assert (caught.value.status, caught.value.code) == (403, "invalid_credentials")
    with pytest.raises(ChatdError) as caught:
        await alice.change_password(PASSWORD, "short")
    assert caught.value.status == 422
    await other.me()  # neither attempt changed anything

    await alice.change_password(PASSWORD, "a new password")
    assert await other_socket.wait_closed() == 1008
    await refused(other)
    assert [s["current"] for s in await alice.sessions()] == [True]
    await alice.me()

    fresh = Api(alice.base_url)
    with pytest.raises(ChatdError):
        await fresh.login(alice.email, PASSWORD)  # type: ignore[attr-defined]
    await fresh.login(alice.email, "a new password")  # type: ignore[attr-defined]
    await fresh.aclose()
    await other.aclose()


async def test_patch_me_changes_the_name(make_user: UserFactory) -> None:
    alice = await make_user("Alice")
    me = await alice.update_me(name="  Alicia ")
    assert me["name"] == "Alicia"
    assert (await alice.me())["name"] == "Alicia"
    assert (await alice.update_me())["name"] == "Alicia"  # nothing given: nothing changes
    for bad in ("", "   ", "x" * 65):
        with pytest.raises(ChatdError) as caught:
            await alice.update_me(name=bad)
        assert caught.value.status == 422
    assert (await alice.me())["name"] == "Alicia"


async def test_logins_past_the_cap_sign_out_the_least_recently_seen(
    database_url: str, make_user: UserFactory
) -> None:
    from chatd.handlers.accounts import MAX_SESSIONS_PER_USER

    alice = await make_user("Alice")
    oldest = await second_login(alice)
    await oldest.me()
    conn = await asyncpg.connect(database_url)
    try:
        # Sessions straight into the table, as if logged in long ago (argon2 is slow).
        await conn.execute(
            "UPDATE sessions SET last_seen_at = now() - interval '1 day' WHERE id = $1",
            uuid.UUID((await oldest.sessions())[0]["id"]),
        )
        await conn.execute(
            "INSERT INTO sessions (id, user_id, device, ip, last_seen_at)"
            " SELECT gen_random_uuid(), $1, 'old', '127.0.0.1', now() - interval '1 hour'"
            " FROM generate_series(1, $2)",
            uuid.UUID(alice.user_uuid or ""),
            MAX_SESSIONS_PER_USER - 2,
        )
    finally:
        await conn.close()
    newest = await second_login(alice)
    await refused(oldest)
    assert len(await newest.sessions()) == MAX_SESSIONS_PER_USER
    await alice.me()
    await newest.aclose()


async def test_a_socket_opened_while_its_session_is_revoked_does_not_survive(
    make_user: UserFactory,
) -> None:
    # Revocations and new sockets racing: every socket of the session ends closed.
    alice = await make_user("Alice")
    other = await second_login(alice)
    other_id = next(s["id"] for s in await alice.sessions() if not s["current"])

    async def open_socket() -> int | None:
        try:
            socket = await other.connect()
        except TokenRefused:
            return 1008
        return await socket.wait_closed()

    started = time.monotonic()
    sockets = [asyncio.create_task(open_socket()) for _ in range(10)]
    await asyncio.sleep(0.05)
    await alice.revoke_session(other_id)
    assert await asyncio.gather(*sockets) == [1008] * 10
    assert time.monotonic() - started < 10
