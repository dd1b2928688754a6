"""GET /metrics: Prometheus text format, counting what happens."""

from __future__ import annotations

import httpx

from chatd.client import Api


def value(text: str, name: str, missing: float | None = None) -> float:
    """The sample `name` (with its labels, if any) in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if missing is not None:
        return missing  # a labelled series appears with its first sample
    raise AssertionError(f"{name} not in /metrics")


async def test_metrics_count_sockets_messages_deliveries_and_errors(
    http: httpx.AsyncClient, alice: Api, bob: Api
) -> None:
    before = (await http.get("/metrics")).text
    async with await alice.connect() as a, await bob.connect():
        during = await http.get("/metrics")
        assert during.status_code == 200
        assert during.headers["content-type"].startswith("text/plain")
        assert value(during.text, "chatd_open_sockets") >= 2

        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        for n in range(3):
            await a.request("send_message", chat_id=chat["id"], text=f"{n}")
        await a.send({"action": "no_such_action"})
        await a.next_event("error")
        after = (await http.get("/metrics")).text

    def grew(name: str) -> float:
        return value(after, name) - value(before, name, missing=0)

    assert grew("chatd_messages_persisted_total") >= 3
    # 3 messages to 2 members, and the chat_created event to both.
    assert grew("chatd_events_delivered_total") >= 3 * 2 + 2
    assert grew('chatd_errors_total{code="unknown_action"}') >= 1
    assert value(after, "chatd_send_seconds_count") >= 3
    assert value(after, 'chatd_db_pool_connections{state="open"}') >= 1


async def test_http_requests_are_counted_and_timed_by_route(
    http: httpx.AsyncClient, alice: Api
) -> None:
    auth = {"Authorization": f"Bearer {alice.access_token}"}
    before = (await http.get("/metrics")).text
    for _ in range(3):
        assert (await http.get("/chats/99999999", headers=auth)).status_code == 404
    assert (await http.get("/no/such/route")).status_code == 404
    after = (await http.get("/metrics")).text

    def grew(name: str) -> float:
        return value(after, name) - value(before, name, missing=0)

    # The route's template, never the path: ids do not become labels.
    route = 'method="GET",route="/chats/{chat_id:int}"'
    assert grew(f'chatd_http_requests_total{{{route},status="404"}}') == 3
    assert grew(f"chatd_http_request_seconds_count{{{route}}}") == 3
    assert grew('chatd_http_requests_total{method="GET",route="unmatched",status="404"}') == 1
    assert "/chats/99999999" not in after
