"""/asyncapi.json: a valid AsyncAPI 3.0 document of /connect, and real frames fit it.

The document is validated against the official AsyncAPI 3.0.0 JSON Schema (kept in
tests/asyncapi/, from @asyncapi/specs 6.8.1: see its README), plus the rules a JSON
Schema cannot say (every $ref resolves; an operation's messages are its channel's). Then
a scripted session of two users records every frame sent and received, and each one must
validate against its message's payload schema, as tests/test_openapi.py does for REST.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import pytest
import websockets

from chatd.client import Api
from chatd.protocol import Ack, ClientAction, Error, ServerFrame
from tests.conftest import ROOT, Server
from tests.test_openapi import refs, resolve

ASYNCAPI_SCHEMA = ROOT / "tests" / "asyncapi" / "asyncapi-3.0.0.schema.json"


@pytest.fixture(scope="module")
def document(server: Server) -> dict[str, Any]:
    response = httpx.get(server.base_url + "/asyncapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


def test_the_document_is_valid_asyncapi_3(document: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(document)
    ]
    assert not errors, "\n".join(errors[:20])


def test_every_ref_resolves_and_operations_use_their_channels_messages(
    document: dict[str, Any],
) -> None:
    for ref in refs(document):
        resolve(document, ref)
    for name, operation in document["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), name
        for message in operation.get("reply", {}).get("messages", []):
            assert message["$ref"].startswith(operation["reply"]["channel"]["$ref"]), name
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_action_ack_and_event_is_described(document: dict[str, Any]) -> None:
    operations = document["operations"]
    for action in ClientAction.__args__:
        name = action.__struct_config__.tag
        operation = operations[f"receive_{name}"]
        assert operation["action"] == "receive"
        replies = [m["$ref"].rsplit("/", 1)[1] for m in operation["reply"]["messages"]]
        assert replies == [f"ack_{name}", "error"]
    for event in ServerFrame.__args__:
        if event not in (Ack, Error):
            assert operations[f"send_{event.__struct_config__.tag}"]["action"] == "send"


def test_docs_link_the_socket_page_which_lists_everything(server: Server) -> None:
    docs = httpx.get(server.base_url + "/docs").text
    assert 'href="docs/socket"' in docs and 'href="asyncapi.json"' in docs
    page = httpx.get(server.base_url + "/docs/socket")
    assert page.status_code == 200 and "<script" not in page.text
    for action in ClientAction.__args__:
        assert f"id='{action.__struct_config__.tag}'" in page.text
    for event in ServerFrame.__args__:
        if event not in (Ack, Error):
            assert f"id='event-{event.__struct_config__.tag}'" in page.text


# --- real frames against the document ---------------------------------------------------------


class Recorder:
    """A raw /connect socket that keeps every frame it sends and receives."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.actions: dict[str, str] = {}  # request_id → action
        self.refused: set[str] = set()  # request_ids answered with an error
        self._n = 0

    @classmethod
    async def open(cls, server: Server, api: Api) -> Recorder:
        headers = {"Authorization": f"Bearer {api.access_token}"}
        recorder = cls(await websockets.connect(server.ws_url, additional_headers=headers))
        recorder.received.append(json.loads(await recorder.ws.recv()))
        return recorder

    async def request(self, action: str, **fields: Any) -> dict[str, Any]:
        self._n += 1
        request_id = f"r{self._n}"
        frame = {"action": action, "request_id": request_id, **fields}
        self.sent.append(frame)
        self.actions[request_id] = action
        await self.ws.send(json.dumps(frame))
        async with asyncio.timeout(10):
            while True:
                reply = json.loads(await self.ws.recv())
                self.received.append(reply)
                if reply.get("request_id") == request_id and reply["action"] in ("ack", "error"):
                    if reply["action"] == "error":
                        self.refused.add(request_id)
                    return reply

    async def drain(self, wait: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(wait):
                while True:
                    self.received.append(json.loads(await self.ws.recv()))


def validator(document: dict[str, Any], message: str) -> jsonschema.Validator:
    root = {
        "$ref": f"#/components/messages/{message}/payload",
        "components": document["components"],
    }
    return jsonschema.Draft202012Validator(root)


async def test_real_frames_fit_the_document(
    document: dict[str, Any], server: Server, alice: Api, bob: Api
) -> None:
    a, b = await Recorder.open(server, alice), await Recorder.open(server, bob)
    try:
        chat = (await a.request("create_chat", type="group", name="G", user_ids=[]))["data"]
        await a.request("add_members", chat_id=chat["id"], user_ids=[bob.user_uuid])
        sent = (await a.request("send_message", chat_id=chat["id"], text="hi @bob"))["data"]
        await b.request("send_message", chat_id=chat["id"], text="hello", reply_to=sent["id"])
        await a.request("edit_message", message_id=sent["id"], text="hi")
        await b.request("react", message_id=sent["id"], emoji="👍")
        await b.request("unreact", message_id=sent["id"], emoji="👍")
        await a.request("pin_message", message_id=sent["id"])
        await a.request("unpin_message", chat_id=chat["id"])
        await b.request("mark_read", message_ids=[sent["id"]])
        await b.request("typing", chat_id=chat["id"])
        await a.request("get_chat", chat_id=chat["id"])
        await a.request("get_message", message_id=sent["id"])
        await a.request("list_chats")
        await a.request("sync", chats={str(chat["id"]): {"seq": 0, "version": 0}})
        await a.request("sync", chats={str(chat["id"]): 0})
        await a.request("forward_message", message_id=sent["id"], chat_id=chat["id"])
        await b.request("report_message", message_id=sent["id"], reason="test")
        await a.request("search_messages", q="hi")
        await a.request("get_presence", user_ids=[bob.user_uuid])
        await a.request("set_notifications", chat_id=chat["id"], notify="mentions")
        await a.request("block_user", user_uuid=bob.user_uuid)
        await a.request("unblock_user", user_uuid=bob.user_uuid)
        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        await a.request("rename_chat", chat_id=chat["id"], name="H")
        await a.request("update_chat", chat_id=chat["id"], name="I", photo=None)
        await alice.update_me(name="Alicia")  # user_updated, to Bob too
        await a.request("delete_message", message_id=sent["id"], for_everyone=False)
        await b.request("delete_message", message_id=sent["id"])
        await a.request("send_message", chat_id=chat["id"], text="")  # an error
        await a.request("remove_member", chat_id=chat["id"], user_uuid=bob.user_uuid)
        other = (await b.request("create_chat", type="group", name="O", user_ids=[]))["data"]
        await b.request("leave_chat", chat_id=other["id"])
        await a.request("delete_chat", chat_id=chat["id"])
        await a.drain()
        await b.drain()
    finally:
        await a.ws.close()
        await b.ws.close()

    assert (len(a.refused), b.refused) == (1, set())  # only the empty text was refused
    validators: dict[str, jsonschema.Validator] = {}

    def check(message: str, frame: dict[str, Any]) -> None:
        if message not in validators:
            validators[message] = validator(document, message)
        errors = [e.message[:200] for e in validators[message].iter_errors(frame)]
        assert not errors, (message, frame, errors)

    seen: set[str] = set()
    for recorder in (a, b):
        for frame in recorder.sent:
            seen.add(f"action_{frame['action']}")
            if frame["request_id"] not in recorder.refused:  # a refused one may break it
                check(f"action_{frame['action']}", frame)
        for frame in recorder.received:
            if frame["action"] == "ack":
                message = f"ack_{recorder.actions[frame['request_id']]}"
            elif frame["action"] == "error":
                message = "error"
            else:
                message = f"event_{frame['action']}"
            check(message, frame)
            seen.add(message)
    # Every action was exercised, and so were most events.
    actions = {f"action_{cls.__struct_config__.tag}" for cls in ClientAction.__args__}
    assert actions <= seen, actions - seen
    assert {
        "error",
        "event_new_message",
        "event_message_updated",
        "event_chat_updated",
        "event_user_updated",
    } <= seen
    # The check has teeth: a frame that breaks its schema does not pass.
    with pytest.raises(AssertionError):
        check("event_new_message", {"action": "new_message", "data": {"id": "x"}})


def test_the_schema_is_asyncapi_3_0_0s() -> None:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    assert schema["title"] == "AsyncAPI 3.0.0 schema."
    assert schema["properties"]["asyncapi"]["const"] == "3.0.0"
