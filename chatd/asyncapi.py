"""The socket protocol, machine-readable: /asyncapi.json (AsyncAPI 3.0) and /docs/socket.

Generated from the same msgspec Structs the socket decodes and encodes
(chatd/protocol.py): every action of the `ClientAction` union, the ack each one answers
(its data typed by the action's handler, chatd/handlers), the error frame, and every
event of the `ServerFrame` union. The document describes chatd, the server: it
*receives* actions on /connect and replies with an ack or an error, and it *sends*
events.
"""

from __future__ import annotations

import html
import json
import typing
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from chatd.handlers import HANDLERS
from chatd.openapi import VERSION
from chatd.protocol import Ack, ClientAction, Created, Error, ServerFrame

JSON = "application/json"
SCHEMA_REF = "#/components/schemas/{name}"
CHANNEL = "connect"


def tag(cls: type) -> str:
    return cls.__struct_config__.tag  # type: ignore[attr-defined]


def ack_data_type(action: type) -> Any:
    """What an action's ack carries: its handler's return type, a Created unwrapped."""
    handler = HANDLERS[action]
    kind = typing.get_type_hints(handler)["return"]
    if typing.get_origin(kind) is Created:
        return typing.get_args(kind)[0]
    return kind


def _doc(cls: type) -> str:
    return (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of /connect."""
    actions = list(ClientAction.__args__)
    events = [cls for cls in ServerFrame.__args__ if cls not in (Ack, Error)]
    data_types = {action: ack_data_type(action) for action in actions}
    kinds: dict[Any, None] = dict.fromkeys([*actions, Error, *events, *data_types.values()])
    schemas, components = msgspec.json.schema_components(kinds, ref_template=SCHEMA_REF)
    schema = dict(zip(kinds, schemas, strict=True))

    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/channels/{CHANNEL}/messages/{name}"}

    def message(name: str, title: str, summary: str, payload: Any) -> dict[str, Any]:
        return {
            "name": name,
            "title": title,
            "summary": summary,
            "contentType": JSON,
            "payload": payload,
        }

    channel_ref = {"$ref": f"#/channels/{CHANNEL}"}
    messages["error"] = message(
        "error",
        "error",
        "The action failed: nothing was changed (see the error codes)",
        schema[Error],
    )
    for action in actions:
        name = tag(action)
        messages[f"action_{name}"] = message(
            name, name, _doc(action) or f"The {name} action", schema[action]
        )
        messages[f"ack_{name}"] = message(
            "ack",
            f"{name} ack",
            f"The answer to {name}: `data` is what it did or found",
            {
                "type": "object",
                "properties": {
                    "action": {"const": "ack"},
                    "request_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "data": schema[data_types[action]],
                },
                "required": ["action", "request_id", "data"],
            },
        )
        operations[f"receive_{name}"] = {
            "action": "receive",
            "channel": channel_ref,
            "title": name,
            "summary": _doc(action) or f"The {name} action",
            "messages": [ref(f"action_{name}")],
            "reply": {"channel": channel_ref, "messages": [ref(f"ack_{name}"), ref("error")]},
        }
    for event in events:
        name = tag(event)
        messages[f"event_{name}"] = message(
            name, name, _doc(event) or f"The {name} event", schema[event]
        )
        operations[f"send_{name}"] = {
            "action": "send",
            "channel": channel_ref,
            "title": name,
            "summary": _doc(event) or f"The {name} event",
            "messages": [ref(f"event_{name}")],
        }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "chatd socket",
            "version": VERSION,
            "description": (
                "chatd's WebSocket protocol on /connect: JSON text frames. Send an action"
                " (with a request_id to get its ack or error); receive acks, errors and"
                " events. The first frame is always unread_messages. docs/protocol.md"
                " tells the rules; /openapi.json describes the REST API."
            ),
        },
        "defaultContentType": JSON,
        "servers": {
            "chatd": {
                "host": "localhost:8000",
                "protocol": "ws",
                "description": "The chatd server itself (wss behind TLS)",
                "security": [
                    {"$ref": "#/components/securitySchemes/bearer"},
                    {"$ref": "#/components/securitySchemes/queryToken"},
                ],
            }
        },
        "channels": {
            CHANNEL: {
                "address": "/connect",
                "title": "/connect",
                "description": "One socket per client; close codes in docs/protocol.md",
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": operations,
        "components": {
            "schemas": components,
            "messages": messages,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "queryToken": {
                    "type": "httpApiKey",
                    "name": "token",
                    "in": "query",
                    "description": "The access token, where headers cannot be set (browsers)",
                },
            },
        },
    }


# --- /docs/socket: every action and event with its schema, without JavaScript -----------------


def _schema_html(schema: Any) -> str:
    return f"<pre>{html.escape(json.dumps(schema, indent=2, ensure_ascii=False))}</pre>"


def socket_page(document: dict[str, Any]) -> str:
    """An offline page of the document: each action (its ack), each event, and the schemas."""
    messages = document["components"]["messages"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>chatd socket protocol</title>",
        "<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "pre{background:#f4f4f4;padding:.5rem;overflow:auto}h3{margin-top:2rem}</style>",
        "</head><body><h1>chatd socket protocol (<code>/connect</code>)</h1>",
        "<p>Machine-readable: <a href='../asyncapi.json'>asyncapi.json</a> (AsyncAPI 3.0). "
        "The REST API: <a href='../docs'>/docs</a>.</p>",
        "<h2 id='actions'>Actions you send</h2>",
    ]
    for key, message in messages.items():
        if key.startswith("action_"):
            name = message["name"]
            parts += [
                f"<h3 id='{name}'>{html.escape(name)}</h3><p>{html.escape(message['summary'])}</p>",
                _schema_html(message["payload"]),
                "<p>Its ack's <code>data</code>:</p>",
                _schema_html(messages[f"ack_{name}"]["payload"]["properties"]["data"]),
            ]
    parts.append("<h2 id='events'>Events you receive</h2>")
    for key, message in messages.items():
        if key.startswith("event_") or key == "error":
            name = message["name"]
            parts += [
                f"<h3 id='event-{name}'>{html.escape(name)}</h3>"
                f"<p>{html.escape(message['summary'])}</p>",
                _schema_html(message["payload"]),
            ]
    parts.append("<h2 id='schemas'>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        parts += [f"<h3 id='schema-{name}'>{html.escape(name)}</h3>", _schema_html(schema)]
    parts.append("</body></html>")
    return "\n".join(parts)


def asyncapi_routes() -> list[BaseRoute]:
    """GET /asyncapi.json and GET /docs/socket; both built once, up front."""
    document = asyncapi_document()
    encoded = msgspec.json.encode(document) + b"\n"
    page = socket_page(document)

    async def asyncapi_json(request: Request) -> Response:
        return Response(encoded, media_type=JSON)

    async def socket_docs(request: Request) -> Response:
        return HTMLResponse(page)

    return [
        Route("/asyncapi.json", asyncapi_json, methods=["GET"]),
        Route("/docs/socket", socket_docs, methods=["GET"]),
    ]
