"""Rate limits and the per-user socket cap, against a real server with tight limits.

Each test uses its own users and its own client address (X-Forwarded-For, which chatd
believes from 127.0.0.1 by default), so the tests do not share buckets. The limits refill
slowly (one event per 10 s or so): a burst made in a test is always well inside its
window, however loaded the machine, and waiting out a Retry-After takes a few seconds.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from chatd import client as client_sdk
from chatd import hub
from chatd.bench import main as bench_main
from chatd.client import Api, ChatdError, Client, Socket
from chatd.config import Rate, Settings, parse_rate
from chatd.ratelimit import RateLimiter, RedisBuckets
from tests.conftest import PASSWORD, Server, start_server, stop_server
from tests.test_client import socket_state

LIMITS = {
    "CHATD_LOGIN_EMAIL_RATE": "3/30s",  # a failed login per email every 10 s, 3 at once
    "CHATD_LOGIN_IP_RATE": "5/50s",
    "CHATD_REGISTER_RATE": "2/20s",
    "CHATD_MESSAGE_RATE": "1/5s",
    "CHATD_MESSAGE_BURST": "4",
    "CHATD_TYPING_RATE": "2/20s",
    "CHATD_SEARCH_RATE": "2/20s",
    "CHATD_MAX_SOCKETS_PER_USER": "2",
    "CHATD_CREATE_CHAT_RATE": "5/50s",  # a chat every 10 s, 5 at once
    "CHATD_ADD_MEMBERS_RATE": "6/60s",  # counted per user added
    "CHATD_GROUPS_PER_DAY": "4",
}


@pytest.fixture(scope="module")
def limited(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(database_url, tmp_path_factory.mktemp("limited"), **LIMITS)
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture
async def http(limited: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=limited.base_url, timeout=30) as client:
        yield client


def new_address() -> str:
    return f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


def new_email() -> str:
    return f"rl-{uuid.uuid4().hex[:12]}@example.com"


async def register(http: httpx.AsyncClient, email: str, address: str) -> httpx.Response:
    body = {"name": "Limited", "email": email, "password": PASSWORD}
    return await http.post("/register", json=body, headers={"X-Forwarded-For": address})


async def login(
    http: httpx.AsyncClient, email: str, address: str, password: str = PASSWORD
) -> httpx.Response:
    body = {"email": email, "password": password}
    return await http.post("/login", json=body, headers={"X-Forwarded-For": address})


def assert_limited(response: httpx.Response) -> float:
    """A 429 rate_limited with Retry-After; return the wait in seconds."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert 0 < error["retry_after_ms"] <= retry_after * 1000
    return retry_after


async def user(limited: Server, http: httpx.AsyncClient) -> Api:
    """A fresh user, registered and logged in from an address of its own."""
    api = Api(limited.base_url)
    email, address = new_email(), new_address()
    assert (await register(http, email, address)).status_code == 201
    tokens = await login(http, email, address)
    api.access_token = tokens.json()["access_token"]
    api.user_uuid = (await api.me())["user_uuid"]
    return api


def rate_limited_count(text: str, limit: str) -> float:
    match = re.search(rf'^chatd_rate_limited_total{{limit="{limit}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# --- login ------------------------------------------------------------------------------


async def test_failed_logins_per_email_are_limited_then_allowed_again(
    http: httpx.AsyncClient,
) -> None:
    known, unknown = new_email(), new_email()
    assert (await register(http, known, new_address())).status_code == 201
    answers = {}
    for email in (known, unknown):
        for _ in range(3):  # each from another address: only the email's limit applies
            wrong = await login(http, email, new_address(), "wrong password")
            assert wrong.status_code == 401
        # The fourth failure is refused before the password is looked at: even the right one.
        refused = await login(http, email, new_address())
        wait = assert_limited(refused)
        answers[email] = (refused.json()["error"]["message"], wait)
    # A locked-out email does not tell whether it has an account.
    assert answers[known][0] == answers[unknown][0]
    assert all(wait <= 10 for _, wait in answers.values())

    await asyncio.sleep(answers[known][1])
    assert (await login(http, known, new_address())).status_code == 200


async def test_failed_logins_per_address_are_limited_and_successes_do_not_count(
    http: httpx.AsyncClient,
) -> None:
    address = new_address()
    email = new_email()
    assert (await register(http, email, new_address())).status_code == 201
    # Successful logins give their attempt back: a busy NAT is not locked out by them.
    for _ in range(8):
        assert (await login(http, email, address)).status_code == 200
    for _ in range(5):  # five failures on five emails: no email reaches its own limit
        assert (await login(http, new_email(), address, "wrong password")).status_code == 401
    wait = assert_limited(await login(http, new_email(), address, "wrong password"))
    assert_limited(await login(http, email, address))  # the right password too
    # Another address is not affected.
    assert (await login(http, email, new_address())).status_code == 200
    await asyncio.sleep(wait)
    assert (await login(http, email, address)).status_code == 200


# --- registration -----------------------------------------------------------------------


async def test_registrations_per_address_are_limited(http: httpx.AsyncClient) -> None:
    address = new_address()
    assert (await register(http, new_email(), address)).status_code == 201
    assert (await register(http, new_email(), address)).status_code == 201
    refused = new_email()
    wait = assert_limited(await register(http, refused, address))
    assert (await register(http, new_email(), new_address())).status_code == 201
    await asyncio.sleep(wait)
    # Nothing was stored for the refused one: it can register now.
    assert (await register(http, refused, address)).status_code == 201


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(
    database_url: str, tmp_path: Path
) -> None:
    # 127.0.0.1 is not the trusted proxy here: its X-Forwarded-For must be ignored, or a
    # client could pick a new address for every request and never be limited.
    srv = await asyncio.to_thread(
        start_server,
        database_url,
        tmp_path,
        **LIMITS,
        CHATD_FORWARDED_ALLOW_IPS="192.0.2.1",
    )
    try:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=30) as client:
            for _ in range(2):
                assert (await register(client, new_email(), new_address())).status_code == 201
            assert_limited(await register(client, new_email(), new_address()))
    finally:
        await asyncio.to_thread(stop_server, srv)
    assert "Traceback" not in srv.log()


# --- messages ---------------------------------------------------------------------------


async def test_a_message_burst_is_limited_and_the_socket_stays_usable(
    limited: Server, http: httpx.AsyncClient
) -> None:
    alice, bob = await user(limited, http), await user(limited, http)
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        sent, refused = [], []
        for n in range(8):  # burst 4, then one per 5 s
            try:
                sent.append(await a.request("send_message", chat_id=chat["id"], text=f"m{n}"))
            except ChatdError as exc:
                assert exc.code == "rate_limited"
                assert exc.retry_after is not None and 0 < exc.retry_after <= 5
                refused.append((f"m{n}", exc.retry_after))
        assert 4 <= len(sent) < 8 and len(refused) == 8 - len(sent)

        # REST sends share the user's bucket: 429 with Retry-After.
        response = await http.post(
            f"/chats/{chat['id']}/messages",
            json={"text": "over rest"},
            headers={"Authorization": f"Bearer {alice.access_token}"},
        )
        wait = assert_limited(response)

        # Nothing was stored for the refused sends.
        history = await bob.history(chat["id"])
        assert [m["text"] for m in history["messages"]] == [m["text"] for m in sent]

        # The socket is still open; after the wait a send goes through.
        await asyncio.sleep(wait)
        late = await a.request("send_message", chat_id=chat["id"], text="after waiting")
        assert late["seq"] == len(sent) + 1


async def test_the_client_sdk_waits_out_the_message_limit(
    limited: Server, http: httpx.AsyncClient
) -> None:
    email, bob = new_email(), await user(limited, http)
    assert (await register(http, email, new_address())).status_code == 201
    async with Client(limited.base_url, email=email, password=PASSWORD) as bot:
        chat = await bot.create_chat([bob.user_uuid])
        sent = [await bot.send(chat["id"], f"paced {n}") for n in range(5)]  # burst 4
    assert [m["seq"] for m in sent] == [1, 2, 3, 4, 5]
    history = await bob.history(chat["id"])
    assert [m["text"] for m in history["messages"]] == [f"paced {n}" for n in range(5)]


async def test_a_retry_is_answered_while_the_sender_is_rate_limited(
    limited: Server, http: httpx.AsyncClient
) -> None:
    alice, bob = await user(limited, http), await user(limited, http)
    auth = {"Authorization": f"Bearer {alice.access_token}"}
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        over_rest = await http.post(
            f"/chats/{chat['id']}/messages",
            json={"text": "rest"},
            headers={**auth, "Idempotency-Key": "rest-1"},
        )
        assert over_rest.status_code == 201
        sent = [
            await a.request("send_message", chat_id=chat["id"], text=f"m{n}", client_msg_id=f"c{n}")
            for n in range(3)
        ]  # the burst of 4 is spent
        with pytest.raises(ChatdError) as caught:
            await a.request("send_message", chat_id=chat["id"], text="new", client_msg_id="c9")
        assert caught.value.code == "rate_limited"

        # Retries of stored messages still get their originals, on the socket and REST.
        again = await a.request("send_message", chat_id=chat["id"], text="m1", client_msg_id="c1")
        assert again == sent[1]
        retried = await http.post(
            f"/chats/{chat['id']}/messages",
            json={"text": "rest"},
            headers={**auth, "Idempotency-Key": "rest-1"},
        )
        assert retried.status_code == 200
        assert retried.json() == over_rest.json()
        # A retry in another chat is still refused as one (and nothing new gets through).
        other = await a.request("create_chat", type="group", name="o", user_ids=[])
        with pytest.raises(ChatdError) as reused:
            await a.request("send_message", chat_id=other["id"], text="m1", client_msg_id="c1")
        assert reused.value.code == "invalid"
        # Answering retries took no token: the limit is as spent as before, no more.
        with pytest.raises(ChatdError) as still:
            await a.request("send_message", chat_id=chat["id"], text="new", client_msg_id="c9")
        assert still.value.code == "rate_limited"
    history = await bob.history(chat["id"])
    assert [m["text"] for m in history["messages"]] == ["rest", "m0", "m1", "m2"]


# --- chats and members --------------------------------------------------------------------


async def test_creating_chats_is_limited_per_user_on_the_socket_and_rest_together(
    limited: Server, http: httpx.AsyncClient
) -> None:
    alice = await user(limited, http)
    others = [await user(limited, http) for _ in range(6)]
    auth = {"Authorization": f"Bearer {alice.access_token}"}
    async with await alice.connect() as a:
        first = await a.request("create_chat", type="private", user_ids=[others[0].user_uuid])
        # Finding the private chat that exists already creates nothing and costs nothing.
        for _ in range(3):
            again = await a.request("create_chat", type="private", user_ids=[others[0].user_uuid])
            assert again["id"] == first["id"]
        for other in others[1:3]:
            await a.request("create_chat", type="private", user_ids=[other.user_uuid])
        for other in others[3:5]:
            body = {"type": "private", "user_ids": [other.user_uuid]}
            assert (await http.post("/chats", json=body, headers=auth)).status_code == 201
        # Five created (burst 5): the sixth is refused on both, and stores nothing.
        with pytest.raises(ChatdError) as caught:
            await a.request("create_chat", type="private", user_ids=[others[5].user_uuid])
        assert caught.value.code == "rate_limited"
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 10
        body = {"type": "group", "name": "g", "user_ids": [others[5].user_uuid]}
        wait = assert_limited(await http.post("/chats", json=body, headers=auth))
        assert (await others[5].chats())["chats"] == []

        await asyncio.sleep(wait)
        late = await a.request("create_chat", type="private", user_ids=[others[5].user_uuid])
        assert len(late["members"]) == 2
    assert len((await others[5].chats())["chats"]) == 1


async def test_adding_members_is_limited_by_the_users_added_not_the_calls(
    limited: Server, http: httpx.AsyncClient
) -> None:
    alice = await user(limited, http)
    people = [await user(limited, http) for _ in range(7)]
    ids = [p.user_uuid for p in people]
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="group", name="team", user_ids=ids[:2])  # 2
        # Three asked, one added: the two members already there are given back.
        await a.request("add_members", chat_id=chat["id"], user_ids=ids[:3])  # 2 + 1
        await a.request("add_members", chat_id=chat["id"], user_ids=ids[3:6])  # 3 + 3 = 6
        # The burst of 6 is spent: one more user is refused, on the socket and over REST.
        with pytest.raises(ChatdError) as caught:
            await a.request("add_members", chat_id=chat["id"], user_ids=[ids[6]])
        assert caught.value.code == "rate_limited"
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 10
        wait = assert_limited(
            await http.post(
                f"/chats/{chat['id']}/members",
                json={"user_ids": [ids[6]]},
                headers={"Authorization": f"Bearer {alice.access_token}"},
            )
        )
        # A new chat puts its other members into it: that counts too, and stores nothing.
        with pytest.raises(ChatdError) as also:
            await a.request("create_chat", type="private", user_ids=[ids[6]])
        assert also.value.code == "rate_limited"
        assert (await people[6].chats())["chats"] == []
        members = (await alice.chat(chat["id"]))["members"]
        assert sorted(m["user_uuid"] for m in members) == sorted([alice.user_uuid, *ids[:6]])

        await asyncio.sleep(wait)
        after = await a.request("add_members", chat_id=chat["id"], user_ids=[ids[6]])
        assert len(after["members"]) == 8


async def test_a_call_over_the_burst_gives_back_only_what_it_was_charged(
    limited: Server, http: httpx.AsyncClient
) -> None:
    alice = await user(limited, http)
    people = [await user(limited, http) for _ in range(13)]
    ids = [p.user_uuid for p in people]
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="group", name="big", user_ids=ids[:6])
        await a.request("set_role", chat_id=chat["id"], user_uuid=ids[0], role="admin")
    async with await people[0].connect() as admin:
        # Ten asked, so the whole burst of 6 is charged; five were members already and five
        # are added: one token comes back, not five.
        grown = await admin.request("add_members", chat_id=chat["id"], user_ids=ids[1:11])
        assert len(grown["members"]) == 12
        with pytest.raises(ChatdError) as caught:
            await admin.request("add_members", chat_id=chat["id"], user_ids=ids[11:13])
        assert caught.value.code == "rate_limited"


async def test_groups_per_day_are_capped_in_the_database(database_url: str, tmp_path: Path) -> None:
    # Its own server: the cap must hold across a restart (it is counted in the database).
    limits = {**LIMITS, "CHATD_CREATE_CHAT_RATE": "off", "CHATD_GROUPS_PER_DAY": "3"}
    srv = await asyncio.to_thread(start_server, database_url, tmp_path, **limits)
    try:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=30) as client:
            alice, bob = await user(srv, client), await user(srv, client)
            groups = [
                await alice.call(
                    "POST", "/chats", json={"type": "group", "name": f"g{n}", "user_ids": []}
                )
                for n in range(3)
            ]
            # Deleting one does not make room: the cap counts groups created.
            await alice.call("DELETE", f"/chats/{groups[0]['id']}")
            refused = await client.post(
                "/chats",
                json={"type": "group", "name": "fourth", "user_ids": [bob.user_uuid]},
                headers={"Authorization": f"Bearer {alice.access_token}"},
            )
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "rate_limited"
            # Until the oldest of the day is a day old.
            assert 86_000 < int(refused.headers["retry-after"]) <= 86_400
            assert (await bob.chats())["chats"] == []
            assert rate_limited_count((await client.get("/metrics")).text, "groups_per_day") == 1
            # Private chats are not groups; other users have their own count.
            await alice.call(
                "POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]}
            )
            await bob.call(
                "POST", "/chats", json={"type": "group", "name": "bob's", "user_ids": []}
            )
    finally:
        await asyncio.to_thread(stop_server, srv)
    assert "Traceback" not in srv.log()

    srv = await asyncio.to_thread(start_server, database_url, tmp_path, **limits)
    try:
        async with await alice_on(srv, alice) as a:
            with pytest.raises(ChatdError) as caught:
                await a.request("create_chat", type="group", name="after restart", user_ids=[])
            assert caught.value.code == "rate_limited"
            assert caught.value.retry_after is not None and caught.value.retry_after > 86_000
    finally:
        await asyncio.to_thread(stop_server, srv)
    assert "Traceback" not in srv.log()


async def alice_on(srv: Server, api: Api) -> Socket:
    """A socket to `srv` for the user of `api` (its token is valid on every server)."""
    return await Api(srv.base_url, api.access_token).connect()


# --- typing -----------------------------------------------------------------------------


async def test_typing_frames_per_user_are_limited(limited: Server, http: httpx.AsyncClient) -> None:
    alice, bob = await user(limited, http), await user(limited, http)
    async with await alice.connect() as a, await bob.connect() as b:
        chats = [
            await a.request("create_chat", type="group", name=f"t{n}", user_ids=[bob.user_uuid])
            for n in range(3)
        ]
        await a.request("typing", chat_id=chats[0]["id"])
        # A repeat inside the per-chat interval is dropped silently and does not count.
        assert await a.request("typing", chat_id=chats[0]["id"]) is None
        await a.request("typing", chat_id=chats[1]["id"])
        with pytest.raises(ChatdError) as caught:
            await a.request("typing", chat_id=chats[2]["id"])
        assert caught.value.code == "rate_limited"
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 10

        # Bob got the two allowed events, not the refused one; Alice's socket still works.
        await a.request("send_message", chat_id=chats[2]["id"], text="still here")
        events = [await b.next_event()]
        while events[-1]["action"] != "new_message":
            events.append(await b.next_event())
        typing = [e["data"]["chat_id"] for e in events if e["action"] == "typing"]
        assert sorted(typing) == [chats[0]["id"], chats[1]["id"]]


async def test_searches_per_user_are_limited(limited: Server, http: httpx.AsyncClient) -> None:
    alice = await user(limited, http)
    async with await alice.connect() as a:
        assert (await a.request("search_messages", q="one"))["results"] == []
        assert (await alice.search("two"))["results"] == []  # REST counts too
        with pytest.raises(ChatdError) as caught:
            await a.request("search_messages", q="three")
        assert caught.value.code == "rate_limited"
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 10
        with pytest.raises(ChatdError) as caught:
            await alice.search("four")
        assert caught.value.status == 429


# --- sockets per user -------------------------------------------------------------------


async def test_the_oldest_socket_is_closed_beyond_the_cap(
    limited: Server, http: httpx.AsyncClient
) -> None:
    alice, bob = await user(limited, http), await user(limited, http)
    first, second = await alice.connect(), await alice.connect()
    third = await alice.connect()  # cap 2: the first one goes
    try:
        assert await first.wait_closed() == 1008
        assert first.ws.close_reason == client_sdk.SOCKET_CAP_REASON == hub.SOCKET_CAP_REASON
        chat = await third.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await bob_sends(bob, chat["id"])
        for sock in (second, third):  # both remaining sockets still get events
            event = await sock.next_event("new_message")
            assert event["data"]["text"] == "hello"
    finally:
        for sock in (first, second, third):
            await sock.close()


async def test_the_client_sdk_gives_way_when_the_cap_closes_its_socket(
    limited: Server, http: httpx.AsyncClient
) -> None:
    email = new_email()
    assert (await register(http, email, new_address())).status_code == 201
    async with Client(limited.base_url, email=email, password=PASSWORD, backoff_cap=1) as bot:
        replaced = bot.socket
        assert replaced is not None
        others = [await Socket.open(limited.ws_url, bot.api.access_token) for _ in range(2)]
        try:
            assert await replaced.wait_closed() == 1008
            # Back after backoff_cap, without a token renewal.
            await socket_state(bot, lambda: bot.socket not in (None, replaced), timeout=20)
            assert bot.reconnects == 1 and bot.renewals == 0
        finally:
            for sock in others:
                await sock.close()


async def bob_sends(bob: Api, chat_id: int) -> None:
    await bob.call("POST", f"/chats/{chat_id}/messages", json={"text": "hello"})


# --- metrics ----------------------------------------------------------------------------


async def test_rate_limit_hits_are_counted_in_metrics(
    limited: Server, http: httpx.AsyncClient
) -> None:
    before = (await http.get("/metrics")).text
    address = new_address()
    for _ in range(2):
        await register(http, new_email(), address)
    assert_limited(await register(http, new_email(), address))
    after = (await http.get("/metrics")).text
    assert rate_limited_count(after, "register") == rate_limited_count(before, "register") + 1
    assert re.search(r'^chatd_errors_total\{code="rate_limited"\} [1-9]', after, re.M)


# --- chatd bench against a limited server -------------------------------------------------


def test_the_bench_names_the_limits_it_ran_into(
    limited: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fanout", "--url", limited.base_url, "--groups", "1", "--members", "3"]
    tiny = ["--rates", "10", "--max-rate", "0", "--step-seconds", "1", "--grace", "1"]
    # Registering 3 users from 127.0.0.1 meets CHATD_REGISTER_RATE (2 at once).
    assert bench_main([*argv, *tiny, "--out", str(tmp_path)]) != 0
    printed = capsys.readouterr()
    assert "CHATD_REGISTER_RATE=off" in printed.out + printed.err


# --- the pieces -------------------------------------------------------------------------


def test_rate_settings_parse_and_switch_off() -> None:
    env = {"CHATD_SECRET": "s" * 40}
    settings = Settings.from_env(
        {
            **env,
            "CHATD_LOGIN_EMAIL_RATE": "5/15min",
            "CHATD_MESSAGE_RATE": "off",
            "CHATD_TYPING_RATE": "3/s",
            "CHATD_MAX_SOCKETS_PER_USER": "0",
        }
    )
    assert settings.login_email_rate is not None
    assert (settings.login_email_rate.count, settings.login_email_rate.period) == (5, 900)
    assert settings.message_rate is None and settings.max_sockets_per_user is None
    assert Settings.from_env(env).message_rate == parse_rate("10/s", burst=30)
    defaults = Settings.from_env(env)
    assert defaults.create_chat_rate == parse_rate("60/h")
    assert defaults.add_members_rate == Rate(count=1000, period=86_400, burst=1000)
    assert defaults.groups_per_day == 100
    tuned = Settings.from_env(
        {**env, "CHATD_ADD_MEMBERS_RATE": "50/2d", "CHATD_GROUPS_PER_DAY": "off"}
    )
    assert tuned.add_members_rate == Rate(count=50, period=172_800, burst=50)
    assert tuned.groups_per_day is None
    for bad in ("ten/min", "5/fortnight", "5"):
        with pytest.raises(SystemExit, match="CHATD_REGISTER_RATE"):
            Settings.from_env({**env, "CHATD_REGISTER_RATE": bad})


async def test_a_limiter_forgets_keys_and_stays_bounded() -> None:
    limiter = RateLimiter("test", parse_rate("1/h"), max_keys=1000)
    assert await limiter.take("victim@example.com") == 0
    for n in range(50_000):  # an attacker cycling through emails...
        assert await limiter.take(f"junk-{n}@example.com") == 0
        if n % 100 == 0:  # ...while hammering one
            assert await limiter.take("victim@example.com") > 0
    assert len(limiter) == 1000
    # The most recent keys, and the hammered one, are still limited.
    assert await limiter.take("junk-49999@example.com") > 0
    assert await limiter.take("victim@example.com") > 0

    slow = RateLimiter("test", parse_rate("2/20s"))
    assert await slow.take("k") == 0 and await slow.take("k") == 0
    assert 0 < await slow.take("k") <= 10  # one event per 10 s comes back
    await slow.give_back("k")  # an event that did not count
    assert await slow.take("k") == 0

    quick = RateLimiter("test", Rate(count=2, period=0.2, burst=2))
    assert await quick.take("k") == 0 and await quick.take("k") == 0
    await asyncio.sleep(0.5)
    assert await quick.take("other") == 0
    assert len(quick) == 1  # "k" is full again, the same as never seen: forgotten


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
async def test_costs_and_give_backs_work_alike_in_both_kinds_of_bucket(
    shared: bool, redis_url: str
) -> None:
    name = f"test_{uuid.uuid4().hex[:8]}"
    rate = Rate(count=5, period=50, burst=5)  # one event per 10 s, 5 at once
    # Two processes' worth of limiters on one Redis, or one process's own.
    remotes = [RedisBuckets(redis_url), RedisBuckets(redis_url)] if shared else [None, None]
    one, other = (RateLimiter(name, rate, remote=remote) for remote in remotes)
    if not shared:
        other = one
    try:
        assert await one.take("k", 3) == 0
        assert await other.take("k", 2) == 0
        assert 5 < await one.take("k") <= 10  # margins: the machine may be slow
        await other.give_back("k", 2)  # two events that did not count
        assert await one.take("k", 2) == 0
        assert await other.take("k") > 0
        # More than the burst counts as the whole burst: allowed on a full bucket, never
        # refused for ever; then one event waits one interval.
        assert await one.take("big", 50) == 0
        assert 5 < await other.take("big") <= 10
        assert await one.take("nothing", 0) == 0
        if shared:
            assert remotes[0] is not None
            ttl = await remotes[0]._redis.pttl(f"chatd:rate:{name}:k")
            assert 40_000 < ttl <= 50_000  # forgotten once full again
    finally:
        for remote in remotes:
            if remote is not None:
                await remote.close()


async def test_a_socket_beyond_the_cap_closes_the_oldest_of_that_user_only(
    limited: Server, http: httpx.AsyncClient
) -> None:
    alice, bob = await user(limited, http), await user(limited, http)
    bobs = [await bob.connect(), await bob.connect()]
    alices: list[Socket] = [await alice.connect() for _ in range(3)]
    try:
        assert await alices[0].wait_closed() == 1008
        for sock in bobs:  # Bob's sockets are not touched by Alice's
            assert sock.ws.close_code is None
    finally:
        for sock in (*bobs, *alices):
            await sock.close()
