"""REST: register, login, token refresh, /me, /users_list, /healthz, and the error body."""

from __future__ import annotations

import time
import uuid

import asyncpg
import httpx
import jwt
import pytest

from chatd import auth
from chatd.client import Api, ChatdError
from tests.conftest import PASSWORD, Server


def unique_email(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_healthz_needs_no_auth(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200


async def test_register_returns_the_new_user(http: httpx.AsyncClient) -> None:
    email = unique_email("Reg")
    response = await http.post(
        "/register", json={"name": " Ada ", "email": email, "password": PASSWORD}
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"user_uuid", "name", "email"}
    assert uuid.UUID(body["user_uuid"])
    assert body["name"] == "Ada"
    assert body["email"] == email.lower()


async def test_register_twice_is_email_taken_whatever_the_case(http: httpx.AsyncClient) -> None:
    email = unique_email()
    first = await http.post("/register", json={"name": "A", "email": email, "password": PASSWORD})
    assert first.status_code == 201
    again = await http.post(
        "/register", json={"name": "B", "email": email.upper(), "password": PASSWORD}
    )
    assert_error(again, 409, "email_taken")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "email": "ok@example.com", "password": PASSWORD},
        {"name": "   ", "email": "ok@example.com", "password": PASSWORD},
        {"name": "x" * 65, "email": "ok@example.com", "password": PASSWORD},
        {"name": "nul\x00", "email": "ok@example.com", "password": PASSWORD},
        {"name": "A", "email": "not-an-email", "password": PASSWORD},
        {"name": "A", "email": "a@b", "password": PASSWORD},
        {"name": "\u200b", "email": "ok@example.com", "password": PASSWORD},
        {"name": "\u3164\u2800 \u200f", "email": "ok@example.com", "password": PASSWORD},
        # invisible and control characters, which would let two addresses look alike
        {"name": "A", "email": "ok\u200b@example.com", "password": PASSWORD},
        {"name": "A", "email": "ok@exa\u200dmple.com", "password": PASSWORD},
        {"name": "A", "email": "\u202eok@example.com", "password": PASSWORD},
        {"name": "A", "email": "ok@example.com\u2066", "password": PASSWORD},
        {"name": "A", "email": "o\x07k@example.com", "password": PASSWORD},
        {"name": "A", "email": "ok@exam\u00adple.com", "password": PASSWORD},
        {"name": "A", "email": "ok\ufeff@example.com", "password": PASSWORD},
        {"name": "A", "email": "ok@example.com", "password": "short"},
        {"name": "A", "email": "ok@example.com", "password": "p" * 129},
        {"name": "A", "email": "ok@example.com"},
        {"name": 5, "email": "ok@example.com", "password": PASSWORD},
        ["not", "an", "object"],
    ],
)
async def test_register_rejects_invalid_input(http: httpx.AsyncClient, body: object) -> None:
    assert_error(await http.post("/register", json=body), 422, "invalid")


async def test_register_rejects_a_body_that_is_not_json(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/register", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "bad_request")


async def test_login_returns_a_token_pair(http: httpx.AsyncClient, alice: Api) -> None:
    response = await http.post("/login", json={"email": alice.email, "password": PASSWORD})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 15 * 60
    assert body["access_token"] != body["refresh_token"]


async def test_login_failures_look_the_same(http: httpx.AsyncClient, alice: Api) -> None:
    wrong = await http.post("/login", json={"email": alice.email, "password": "wrong password"})
    unknown = await http.post("/login", json={"email": unique_email(), "password": PASSWORD})
    assert_error(wrong, 401, "invalid_credentials")
    assert_error(unknown, 401, "invalid_credentials")
    assert wrong.json() == unknown.json()


async def test_login_ignores_email_case(http: httpx.AsyncClient, alice: Api) -> None:
    response = await http.post("/login", json={"email": alice.email.upper(), "password": PASSWORD})
    assert response.status_code == 200


async def test_emails_are_normalized_nfc_with_an_idna_domain(http: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:10]
    decomposed = f"Re\u0301ka-{tag}@Bücher.Example"  # e + combining acute, Unicode domain
    stored = f"r\u00e9ka-{tag}@xn--bcher-kva.example"
    registered = await http.post(
        "/register", json={"name": "Réka", "email": decomposed, "password": PASSWORD}
    )
    assert registered.status_code == 201, registered.text
    assert registered.json()["email"] == stored
    for spelling in (
        decomposed,
        stored,
        f"R\u00c9KA-{tag}@BÜCHER.EXAMPLE",
        f"r\u00e9ka-{tag}@\uff42ücher.example",
    ):
        response = await http.post("/login", json={"email": spelling, "password": PASSWORD})
        assert response.status_code == 200, spelling
        again = await http.post(
            "/register", json={"name": "Twin", "email": spelling, "password": PASSWORD}
        )
        assert_error(again, 409, "email_taken")
    api = Api(str(http.base_url))
    await api.login(stored, PASSWORD)
    assert (await api.me())["email"] == stored
    assert [u["name"] for u in await api.users(q=decomposed)] == ["Réka"]


@pytest.mark.parametrize(
    "email", ["ok\u200b@example.com", "\u202eok@example.com", "ok@example.com\u2060", "o\x1bk@x.io"]
)
async def test_login_refuses_invisible_characters_in_emails(
    http: httpx.AsyncClient, email: str
) -> None:
    response = await http.post("/login", json={"email": email, "password": PASSWORD})
    assert_error(response, 422, "invalid")


async def test_accounts_registered_under_the_older_check_still_log_in(
    http: httpx.AsyncClient, server: Server, database_url: str
) -> None:
    """An address email-validator refuses (a reserved domain) was accepted before: its
    account logs in as it is stored, and is found by its whole address."""
    email = f"old-{uuid.uuid4().hex[:10]}@corp.local"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO users (name, email, password_hash) VALUES ('Old', $1, $2)",
            email,
            await auth.hash_password(PASSWORD),
        )
    finally:
        await conn.close()
    assert_error(
        await http.post("/register", json={"name": "New", "email": email, "password": PASSWORD}),
        422,
        "invalid",
    )
    response = await http.post("/login", json={"email": email.upper(), "password": PASSWORD})
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    found = await http.get(
        "/users_list", params={"q": email}, headers={"Authorization": f"Bearer {token}"}
    )
    assert [u["name"] for u in found.json()["users"]] == ["Old"]


async def test_refresh_token_works_exactly_once(server: Server, alice: Api) -> None:
    old_refresh = alice.refresh_token
    tokens = await alice.refresh()
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert (await alice.me())["user_uuid"] == alice.user_uuid  # the new access token works

    reuse = Api(server.base_url)
    reuse.refresh_token = old_refresh
    with pytest.raises(ChatdError) as reused:
        await reuse.refresh()
    assert (reused.value.status, reused.value.code) == (401, "unauthorized")


async def test_reusing_a_refresh_token_revokes_its_descendants(server: Server, alice: Api) -> None:
    stolen = alice.refresh_token
    await alice.refresh()  # the legitimate client rotates
    thief = Api(server.base_url)
    thief.refresh_token = stolen
    with pytest.raises(ChatdError):
        await thief.refresh()  # reuse detected
    with pytest.raises(ChatdError) as revoked:
        await alice.refresh()  # the whole family is revoked; log in again
    assert revoked.value.status == 401


async def test_tokens_are_not_interchangeable(http: httpx.AsyncClient, alice: Api) -> None:
    as_refresh = await http.post("/token/refresh", json={"refresh_token": alice.access_token})
    assert_error(as_refresh, 401, "unauthorized")
    as_access = await http.get("/me", headers={"Authorization": f"Bearer {alice.refresh_token}"})
    assert_error(as_access, 401, "unauthorized")


# What GET /me says of a bot (tests/test_bots.py); of a person: false and null.
BOT_FIELDS = {"is_bot", "bot_id", "bot_username"}


async def test_me_describes_the_caller(alice: Api) -> None:
    me = await alice.me()
    assert (
        set(me)
        == {"user_uuid", "name", "email", "created_at", "avatar", "share_presence", "picture"}
        | BOT_FIELDS
    )
    assert (me["is_bot"], me["bot_id"], me["bot_username"]) == (False, None, None)
    assert me["share_presence"] is True
    assert me["picture"] is None  # only users of the app's tokens have one
    assert me["name"] == "Alice"
    assert me["email"] == alice.email
    assert me["created_at"].endswith("Z")


def forged(server: Server, **claims: object) -> str:
    now = int(time.time())
    base = {"sub": str(uuid.uuid4()), "typ": "access", "iat": now, "exp": now + 60}
    return jwt.encode({**base, **claims}, server.secret, algorithm="HS256")


@pytest.mark.parametrize("path", ["/me", "/users_list", "/history/1"])
async def test_protected_routes_need_a_valid_access_token(
    http: httpx.AsyncClient, server: Server, alice: Api, path: str
) -> None:
    expired = forged(server, sub=alice.user_uuid, exp=int(time.time()) - 10)
    wrong_key = jwt.encode(
        {"sub": alice.user_uuid, "typ": "access", "exp": int(time.time()) + 60},
        "another-secret-of-enough-length-to-sign-with",
        algorithm="HS256",
    )
    unsigned = jwt.encode(
        {"sub": alice.user_uuid, "typ": "access", "exp": int(time.time()) + 60},
        None,
        algorithm="none",
    )
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": f"Bearer {expired}"},
        {"Authorization": f"Bearer {wrong_key}"},
        {"Authorization": f"Bearer {unsigned}"},
    ):
        assert_error(await http.get(path, headers=headers), 401, "unauthorized")


async def test_users_list_matches_name_prefixes_but_only_whole_emails(make_user) -> None:
    """No enumeration: an email is found only by the whole address, never by a prefix."""
    tag = uuid.uuid4().hex[:8]
    zed = await make_user(f"Zed{tag}")
    await make_user(f"Zoe{tag}")
    by_name = await zed.users(q=f"zed{tag}")
    assert [u["name"] for u in by_name] == [f"Zed{tag}"]
    assert set(by_name[0]) == {"user_uuid", "name", "avatar"}  # nobody's email is listed
    email = zed.email
    for prefix in (email[:12], email.split("@")[0], email.split("@")[0] + "@", email[:-1]):
        assert await zed.users(q=prefix) == [], prefix
    for whole in (email, email.upper(), f" {email} "):
        assert [u["user_uuid"] for u in await zed.users(q=whole)] == [zed.user_uuid], whole
    assert await zed.users(q="%") == []  # LIKE wildcards are matched literally
    assert await zed.users(q=f"%@{email.split('@')[1]}") == []


async def test_users_list_pages_with_a_keyset_cursor(make_user) -> None:
    tag = uuid.uuid4().hex[:8]
    users = [await make_user(f"Page{tag}{i}") for i in range(5)]
    api = users[0]
    seen: list[str] = []
    after = None
    while True:
        params = {"q": f"page{tag}", "limit": 2}
        if after:
            params["after"] = after
        page = await api.users(**params)
        if not page:
            break
        assert len(page) <= 2
        seen += [u["name"] for u in page]
        after = page[-1]["user_uuid"]
    assert seen == [f"Page{tag}{i}" for i in range(5)]


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 201}, {"limit": "x"}, {"after": "nope"}]
)
async def test_users_list_rejects_bad_parameters(
    http: httpx.AsyncClient, alice: Api, params: dict
) -> None:
    response = await http.get(
        "/users_list", params=params, headers={"Authorization": f"Bearer {alice.access_token}"}
    )
    assert_error(response, 422, "invalid")


async def test_unknown_routes_answer_with_the_error_body(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/no/such/route"), 404, "not_found")
    assert_error(await http.get("/register"), 405, "method_not_allowed")
