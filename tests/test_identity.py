"""External identity: the app's JWTs (shared secret, JWKS) as chatd access tokens.

One identity provider (tests/idp.py: a real JWKS endpoint in a thread of this process)
and one chatd for the module, with local accounts switched off: every user here exists
only in the "app".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import jwt
import pytest
import websockets

from chatd.client import Api, ChatdError, Socket
from chatd.config import Settings
from tests.conftest import Server, assert_no_tracebacks, start_server, stop_server
from tests.idp import AUDIENCE, ISSUER, SHARED_SECRET, IdentityProvider, hand_signed, new_key

MIN_REFRESH = 2  # CHATD_AUTH_JWKS_MIN_REFRESH of the module's server
MAX_AGE = 4  # CHATD_AUTH_JWKS_MAX_AGE


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def app_server(
    idp: IdentityProvider, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = idp.server_env(
        CHATD_AUTH_JWKS_MIN_REFRESH=str(MIN_REFRESH),
        CHATD_AUTH_JWKS_MAX_AGE=str(MAX_AGE),
        CHATD_LOCAL_ACCOUNTS="false",
    )
    server = start_server(database_url, tmp_path_factory.mktemp("identity"), **env)
    yield server
    stop_server(server)
    assert_no_tracebacks(server)


def subject() -> str:
    return f"app-user-{uuid.uuid4().hex[:10]}"


async def status_of(server: Server, token: str | None) -> tuple[int, str | None]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        response = await http.get("/me", headers=headers)
    code = response.json()["error"]["code"] if response.is_error else None
    return response.status_code, code


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "HS256"])
async def test_a_token_of_the_app_is_an_access_token(
    app_server: Server, idp: IdentityProvider, algorithm: str
) -> None:
    sub = subject()
    token = idp.token(sub, algorithm, name="Ada Lovelace", picture="https://cdn.example/ada.png")
    async with Api(app_server.base_url, token) as api:
        me = await api.me()
        assert me["name"] == "Ada Lovelace"
        assert me["picture"] == "https://cdn.example/ada.png"
        # The same (iss, sub), with another token (another algorithm even): the same user.
        api.access_token = idp.token(sub, "HS256" if algorithm != "HS256" else "RS256")
        assert (await api.me())["user_uuid"] == me["user_uuid"]
    # And on /connect.
    async with await Socket.open(api.ws_url, token) as sock:
        chats = await sock.request("list_chats")
        assert chats["chats"] == []


async def test_two_app_users_talk(app_server: Server, idp: IdentityProvider) -> None:
    ada = Api(app_server.base_url, idp.token(subject(), name="Ada"))
    bob = Api(app_server.base_url, idp.token(subject(), "ES256", name="Bob"))
    bob_uuid = (await bob.me())["user_uuid"]
    chat = await ada.call("POST", "/chats", json={"type": "private", "user_ids": [bob_uuid]})
    async with await Socket.open(bob.ws_url, bob.access_token) as sock:
        await ada.call(
            "POST", f"/chats/{chat['id']}/messages", json={"text": "hi Bob", "client_msg_id": "m1"}
        )
        event = await sock.next_event("new_message")
        assert event["data"]["text"] == "hi Bob"
    await ada.aclose()
    await bob.aclose()


async def test_name_claim_changes_update_the_profile(
    app_server: Server, idp: IdentityProvider
) -> None:
    sub = subject()
    ada = Api(app_server.base_url, idp.token(subject(), name="Ada"))
    bob = Api(app_server.base_url, idp.token(sub, name="Bob"))
    bob_uuid = (await bob.me())["user_uuid"]
    await ada.call("POST", "/chats", json={"type": "private", "user_ids": [bob_uuid]})
    async with await Socket.open(ada.ws_url, ada.access_token) as sock:
        bob.access_token = idp.token(sub, name="Robert", picture="https://cdn.example/r.png")
        me = await bob.me()
        assert (me["name"], me["picture"]) == ("Robert", "https://cdn.example/r.png")
        event = await sock.next_event("user_updated")
        assert event["data"]["name"] == "Robert"
    # A rename in chatd stays while the provider's name does not change...
    await bob.update_me(name="Bobby")
    assert (await bob.me())["name"] == "Bobby"
    # ...and a token without the claims (an access token, say) leaves them alone.
    bob.access_token = idp.token(sub)
    me = await bob.me()
    assert (me["name"], me["picture"]) == ("Bobby", "https://cdn.example/r.png")
    # A name that is no printable text is cleaned, not refused.
    bob.access_token = idp.token(sub, name="  Rob\x00\u200bert  " + "x" * 500)
    assert (await bob.me())["name"].startswith("Robert xxx")
    await ada.aclose()
    await bob.aclose()


def refused_tokens(idp: IdentityProvider) -> dict[str, str]:
    """Tokens that must never authenticate, by what is wrong with them."""
    sub = subject()
    rs = idp.key("RS256")
    es = idp.key("ES256")
    now = int(time.time())
    claims = idp.claims(sub)
    stranger = new_key("RS256")
    return {
        "expired": idp.token(sub, exp=now - 1),
        "expired_hs256": idp.token(sub, "HS256", exp=now - 1),
        "not_yet_valid": idp.token(sub, nbf=now + 60),
        "issued_in_the_future": idp.token(sub, iat=now + 60),
        "no_exp": hand_signed_rs(idp, {k: v for k, v in claims.items() if k != "exp"}),
        "foreign_issuer": idp.token(sub, iss="https://evil.example.test"),
        "wrong_audience": idp.token(sub, aud="another-app"),
        "no_sub": idp.token(sub, sub=""),
        "alg_none": hand_signed({"alg": "none", "typ": "JWT"}, claims, None),
        "alg_none_with_kid": hand_signed({"alg": "none", "kid": rs.kid}, claims, None),
        # HS/RS confusion: HMAC with the provider's *public* key as the secret.
        "hs256_with_public_key": hand_signed(
            {"alg": "HS256", "kid": rs.kid}, claims, rs.public_pem()
        ),
        "hs256_with_public_jwk": hand_signed(
            {"alg": "HS256", "kid": rs.kid}, claims, str(rs.public_jwk()).encode()
        ),
        "hs256_wrong_secret": jwt.encode(claims, "another-secret-" + "q" * 40, "HS256"),
        # An EC key's kid on a token that says RS256, and the reverse.
        "es_key_as_rs256": jwt.encode(claims, rs.private, "RS256", headers={"kid": es.kid}),
        "rs_key_as_es256": jwt.encode(claims, es.private, "ES256", headers={"kid": rs.kid}),
        "unknown_key": jwt.encode(claims, stranger.private, "RS256", headers={"kid": rs.kid}),
        "unknown_kid": jwt.encode(claims, stranger.private, "RS256", headers={"kid": stranger.kid}),
        "no_kid": jwt.encode(claims, rs.private, "RS256"),
        "ps256": jwt.encode(claims, rs.private, "PS256", headers={"kid": rs.kid}),
        "tampered": _tampered(idp.token(sub)),
        "garbage": "not.a.jwt",
    }


def hand_signed_rs(idp: IdentityProvider, claims: dict[str, object]) -> str:
    key = idp.key("RS256")
    return jwt.encode(claims, key.private, "RS256", headers={"kid": key.kid})


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    import base64
    import json

    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def test_bad_tokens_are_refused_on_rest_and_connect(
    app_server: Server, idp: IdentityProvider, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    users_before = await conn.fetchval("SELECT count(*) FROM users")
    for what, token in refused_tokens(idp).items():
        assert await status_of(app_server, token) == (401, "unauthorized"), what
        async with websockets.connect(
            app_server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1008, what
    # Nobody was created by any of them.
    assert await conn.fetchval("SELECT count(*) FROM users") == users_before
    await conn.close()


async def test_hs256_is_refused_without_a_shared_secret(
    idp: IdentityProvider, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A server that trusts the JWKS only: a token signed with HMAC, even with the
    provider's public key or with the HS secret some other server has, is refused."""
    env = idp.server_env(secret=False)
    server = start_server(database_url, tmp_path_factory.mktemp("jwks-only"), **env)
    try:
        rs = idp.key("RS256")
        claims = idp.claims(subject())
        for token in (
            idp.token(subject(), "HS256"),
            hand_signed({"alg": "HS256", "kid": rs.kid}, claims, rs.public_pem()),
        ):
            assert await status_of(server, token) == (401, "unauthorized")
        assert (await status_of(server, idp.token(subject())))[0] == 200
    finally:
        stop_server(server)
    assert_no_tracebacks(server)


async def test_key_rotation(app_server: Server, idp: IdentityProvider) -> None:
    """A new key is fetched when a token names it; a withdrawn key stops working once the
    set is older than CHATD_AUTH_JWKS_MAX_AGE; the floor bounds fetches."""
    sub = subject()
    old = idp.key("RS256")
    assert (await status_of(app_server, idp.token(sub, key=old)))[0] == 200
    await asyncio.sleep(MIN_REFRESH + 0.2)  # the floor since the last fetch has passed
    new = idp.rotate("RS256")
    fetches = idp.fetches
    assert (await status_of(app_server, idp.token(sub, key=new)))[0] == 200
    assert idp.fetches == fetches + 1
    # Both are published: the old one still works, and asks nothing.
    assert (await status_of(app_server, idp.token(sub, key=old)))[0] == 200
    assert idp.fetches == fetches + 1
    idp.withdraw(old.kid)
    await asyncio.sleep(MAX_AGE + 0.5)
    assert await status_of(app_server, idp.token(sub, key=old)) == (401, "unauthorized")
    assert (await status_of(app_server, idp.token(sub, key=new)))[0] == 200


async def test_unknown_kids_cannot_make_chatd_hammer_the_provider(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Tokens naming made-up kids cost the provider one fetch, however many arrive at
    once, and none more until the floor has passed. The floor here is an hour, so the
    count does not depend on how fast this machine is."""
    with IdentityProvider() as idp:
        env = idp.server_env(secret=False, CHATD_AUTH_JWKS_MIN_REFRESH="3600")
        server = start_server(database_url, tmp_path_factory.mktemp("made-up-kids"), **env)
        try:
            claims = idp.claims(subject())
            stranger = new_key("RS256")
            for burst in range(2):
                tokens = [
                    jwt.encode(
                        claims, stranger.private, "RS256", headers={"kid": f"made-up-{burst}-{i}"}
                    )
                    for i in range(30)
                ]
                results = await asyncio.gather(*(status_of(server, t) for t in tokens))
                assert set(results) == {(401, "unauthorized")}
                assert idp.fetches == 1
        finally:
            stop_server(server)
    assert_no_tracebacks(server)


async def test_provider_down_at_start(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Keys that cannot be fetched answer 503 unavailable (the token may be good), and
    1013 on /connect; once the provider is back (and the floor passed) it works."""
    with IdentityProvider() as idp:
        idp.status = 503
        env = idp.server_env(secret=False, CHATD_AUTH_JWKS_MIN_REFRESH="1")
        server = start_server(database_url, tmp_path_factory.mktemp("idp-down"), **env)
        try:
            token = idp.token(subject())
            assert await status_of(server, token) == (503, "unavailable")
            async with websockets.connect(
                server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}
            ) as ws:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1013
            idp.status = 200
            await asyncio.sleep(1.2)
            assert (await status_of(server, token))[0] == 200
        finally:
            stop_server(server)
        assert_no_tracebacks(server)


async def test_disabling_the_user_ends_their_tokens_and_sockets(
    app_server: Server, idp: IdentityProvider, database_url: str
) -> None:
    admin_sub, sub = subject(), subject()
    admin = Api(app_server.base_url, idp.token(admin_sub, name="Admin"))
    admin_uuid = (await admin.me())["user_uuid"]
    conn = await asyncpg.connect(database_url)
    await conn.execute("UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(admin_uuid))
    await conn.close()
    user = Api(app_server.base_url, idp.token(sub, name="Mallory"))
    user_uuid = (await user.me())["user_uuid"]
    async with await Socket.open(user.ws_url, user.access_token) as sock:
        await admin.call("PATCH", f"/admin/users/{user_uuid}", json={"disabled": True})
        assert await sock.wait_closed() == 1008
    assert await status_of(app_server, idp.token(sub)) == (401, "unauthorized")
    await admin.call("PATCH", f"/admin/users/{user_uuid}", json={"disabled": False})
    assert (await status_of(app_server, idp.token(sub)))[0] == 200
    await admin.aclose()
    await user.aclose()


async def test_local_accounts_off(app_server: Server, idp: IdentityProvider) -> None:
    async with Api(app_server.base_url) as api:
        for path, body in (
            ("/register", {"name": "L", "email": "l@example.com", "password": "x" * 12}),
            ("/login", {"email": "l@example.com", "password": "x" * 12}),
        ):
            with pytest.raises(ChatdError) as refused:
                await api.call("POST", path, json=body)
            assert (refused.value.status, refused.value.code) == (403, "forbidden")
    # So the web client's own page offers no password form (tests/browser: what it shows).
    async with httpx.AsyncClient(base_url=app_server.base_url, timeout=30) as http:
        assert '<html data-local-accounts="false" ' in (await http.get("/chat")).text
    # The app's token has no chatd session to sign out: the app signs its users out.
    async with Api(app_server.base_url, idp.token(subject())) as api:
        with pytest.raises(ChatdError) as refused:
            await api.call("POST", "/logout")
        assert (refused.value.status, refused.value.code) == (403, "forbidden")
        # Otherwise it is the user's login: tokens and bots of their own, say.
        made = await api.call("POST", "/me/tokens", json={"name": "cli", "scopes": ["read"]})
        assert made["token"].startswith("chatd_pat_")


def test_settings_need_issuer_audience_and_a_strong_distinct_secret() -> None:
    base = {"CHATD_SECRET": "s" * 48}
    with pytest.raises(SystemExit, match="CHATD_AUTH_ISSUER and CHATD_AUTH_AUDIENCE"):
        Settings.from_env({**base, "CHATD_AUTH_JWT_SECRET": SHARED_SECRET})
    with pytest.raises(SystemExit, match="CHATD_AUTH_AUDIENCE"):
        Settings.from_env(
            {**base, "CHATD_AUTH_JWKS_URL": "https://x/jwks", "CHATD_AUTH_ISSUER": ISSUER}
        )
    full = {**base, "CHATD_AUTH_ISSUER": ISSUER, "CHATD_AUTH_AUDIENCE": AUDIENCE}
    with pytest.raises(SystemExit, match="too weak"):
        Settings.from_env({**full, "CHATD_AUTH_JWT_SECRET": "short"})
    with pytest.raises(SystemExit, match="must differ"):
        Settings.from_env({**full, "CHATD_AUTH_JWT_SECRET": "s" * 48})
    with pytest.raises(SystemExit, match="http"):
        Settings.from_env({**full, "CHATD_AUTH_JWKS_URL": "file:///etc/passwd"})
    settings = Settings.from_env({**full, "CHATD_AUTH_JWT_SECRET": SHARED_SECRET})
    assert settings.auth_jwt_secret == SHARED_SECRET


async def test_client_with_a_token_provider(app_server: Server, idp: IdentityProvider) -> None:
    """chatd.client.Client signs in through the app: its token provider (sync or async)
    gives each token, again before `exp` and after a refusal; REST and the socket both
    keep working across renewals."""
    from chatd.client import Client

    ada_sub, bob_sub = subject(), subject()
    calls = {"ada": 0, "bob": 0}

    async def ada_token() -> str:
        calls["ada"] += 1
        return idp.token(ada_sub, name="Ada", ttl_seconds=3)

    def bob_token() -> str:
        calls["bob"] += 1
        return idp.token(bob_sub, "ES256", name="Bob")

    async with (
        Client(app_server.base_url, token_provider=ada_token) as ada,
        Client(app_server.base_url, token_provider=bob_token) as bob,
    ):
        assert ada.api.refresh_token is None
        chat = await ada.create_chat([bob.user_uuid])
        await asyncio.sleep(3.5)  # Ada's first token has expired; it was renewed before
        assert calls["ada"] >= 2
        assert (await ada.rest("GET", "/me"))["name"] == "Ada"
        await ada.send(chat["id"], "hello through the app's sign-in")
        async for event in bob.events():
            if event["action"] == "new_message":
                assert event["data"]["text"] == "hello through the app's sign-in"
                break
        # A token chatd refuses (expired here) is replaced by a fresh one from the provider.
        before = calls["bob"]
        bob.api.access_token = idp.token(bob_sub, "ES256", exp=int(time.time()) - 1)
        assert (await bob.rest("GET", "/me"))["user_uuid"] == bob.user_uuid
        assert calls["bob"] == before + 1


async def test_provider_shaped_tokens(app_server: Server, idp: IdentityProvider) -> None:
    """Auth0's access tokens name several audiences; Keycloak's carry typ, azp and
    preferred_username; both are taken as they are."""
    sub = subject()
    auth0 = idp.token(sub, aud=["https://api.example.test", AUDIENCE], scope="openid")
    assert (await status_of(app_server, auth0))[0] == 200
    keycloak = idp.token(
        subject(), typ="Bearer", azp="chat", preferred_username="ada.l", session_state="x"
    )
    async with Api(app_server.base_url, keycloak) as api:
        assert (await api.me())["name"] == "ada.l"


async def test_the_bot_sdk_with_a_token_provider(app_server: Server, idp: IdentityProvider) -> None:
    """chatd.bot.Bot signed in through the app: it answers over the socket and over REST,
    and a refused token is replaced by the provider's next one."""
    from chatd.bot import Bot

    helper_sub, ada_sub = subject(), subject()
    asked = []

    def helper_token() -> str:
        asked.append(1)
        return idp.token(helper_sub, name="Helper")

    bot = Bot(app_server.base_url, token_provider=helper_token)

    @bot.on_message
    async def echo(event) -> None:  # type: ignore[no-untyped-def]
        await event.reply(f"echo: {event.message.text}")

    started = asyncio.Event()
    running = asyncio.create_task(bot.run_async(started))
    await asyncio.wait_for(started.wait(), 10)
    async with Api(app_server.base_url, idp.token(ada_sub, name="Ada")) as ada:
        chat = await ada.call(
            "POST", "/chats", json={"type": "private", "user_ids": [bot.user_uuid]}
        )
        async with await ada.connect() as sock:
            await sock.request("send_message", chat_id=chat["id"], text="hi", client_msg_id="1")
            while True:
                event = await sock.next_event("new_message")
                if event["data"]["sender_uuid"] == bot.user_uuid:
                    break
            assert event["data"]["text"] == "echo: hi"
        # REST with a token chatd refuses (expired): the provider gives the next one.
        bot.api.access_token = idp.token(helper_sub, exp=int(time.time()) - 1)
        before = len(asked)
        sent = await bot.send(chat["id"], "over REST")
        assert sent["text"] == "over REST" and len(asked) == before + 1
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
