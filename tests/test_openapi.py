"""/openapi.json and /docs: the document covers every Operation, is valid OpenAPI 3.1, agrees
with what the server really answers, and Swagger UI loads with no request leaving chatd.

The tests walk chatd.rest.OPERATIONS, so a new route is checked without editing this file.
"""

from __future__ import annotations

import io
import re
import uuid
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema
import msgspec
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from PIL import Image

from chatd import rest
from chatd.client import Api
from chatd.openapi import TRANSPORT_ERRORS, Operation, Param, openapi_document
from chatd.protocol import Ack, ErrorResponse, Health, Message, Sync, SyncResult
from tests.conftest import Server

OPERATIONS = {f"{op.method} {op.path}": op for op in rest.OPERATIONS}
SCHEMAS = "#/components/schemas/"


def openapi_path(op: Operation) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", r"{\1}", op.path)


def sample_path(op: Operation) -> str:
    """op.path with a well-formed value in each parameter."""

    def value(match: re.Match[str]) -> str:
        name, convertor = match[1], match[2]
        if convertor == "int":
            return "1"
        return str(uuid.uuid4()) if name.endswith("uuid") or convertor == "uuid" else "x"

    return re.sub(r"\{(\w+)(?::(\w+))?\}", value, op.path)


def ref(struct: type) -> dict[str, str]:
    return {"$ref": SCHEMAS + struct.__name__}


@pytest.fixture(scope="module")
def document(server: Server) -> dict[str, Any]:
    response = httpx.get(server.base_url + "/openapi.json", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


def resolve(document: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), f"{pointer} does not point inside the document"
    node: Any = document
    for part in pointer[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{pointer} does not resolve"
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Validator:
    """A JSON Schema 2020-12 validator for `schema`, whose $refs point into `document`."""
    root = {**schema, "components": document["components"]}
    return jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def check_response(document: dict[str, Any], op: Operation, response: httpx.Response) -> None:
    """The status is one the document lists for `op`, and the body fits its schema."""
    responses = document["paths"][openapi_path(op)][op.method.lower()]["responses"]
    status = str(response.status_code)
    assert status in responses, f"{op.method} {op.path} answered undocumented {status}"
    content = responses[status].get("content")
    if content is None:
        assert response.content == b""
        return
    if op.raw_response is not None and response.is_success:
        assert set(content) == {op.raw_response}  # the bytes of a file
        return
    assert response.headers["content-type"].startswith("application/json")
    validator(document, content["application/json"]["schema"]).validate(response.json())


# --- the document --------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "chatd"
    validate(document, cls=OpenAPIV31SpecValidator)


def test_it_describes_exactly_the_operations(document: dict[str, Any]) -> None:
    documented = {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    }
    assert documented == {f"{op.method} {openapi_path(op)}" for op in rest.OPERATIONS}
    operation_ids = [
        op["operationId"] for item in document["paths"].values() for op in item.values()
    ]
    assert len(operation_ids) == len(set(operation_ids)) == len(rest.OPERATIONS)


def test_every_ref_resolves_inside_the_document(document: dict[str, Any]) -> None:
    found = refs(document)
    assert len(found) > len(rest.OPERATIONS)  # the walk did reach into the paths
    for pointer in found:
        target = resolve(document, pointer)
        assert isinstance(target, dict) and target, pointer


@pytest.mark.parametrize("key", OPERATIONS)
def test_each_operation_is_described(document: dict[str, Any], key: str) -> None:
    op = OPERATIONS[key]
    item = document["paths"][openapi_path(op)][op.method.lower()]
    assert item["summary"] == op.summary
    assert item["operationId"].startswith(op.endpoint.__name__)

    parameters = {(p["in"], p["name"]): p for p in item.get("parameters", [])}
    path_names = re.findall(r"\{(\w+)", op.path)
    assert set(parameters) == {
        *(("path", name) for name in path_names),
        *(("query", p.name) for p in op.query),
        *(("header", p.name) for p in op.headers),
    }
    for name in path_names:
        assert parameters["path", name]["required"] is True
    for where, params in (("query", op.query), ("header", op.headers)):
        for p in params:
            assert parameters[where, p.name]["required"] is p.required
            assert parameters[where, p.name]["description"] == p.description

    if op.raw_body is not None:  # an upload: its media types, not JSON
        assert set(item["requestBody"]["content"]) == set(op.raw_body)
    elif op.body is None:
        assert "requestBody" not in item
    else:
        body = item["requestBody"]["content"]["application/json"]["schema"]
        if isinstance(op.body, type) and issubclass(op.body, msgspec.Struct):
            assert body == ref(op.body)

    responses = item["responses"]
    successes = {op.status, *op.also_ok}
    expected = {*successes, *op.errors, *TRANSPORT_ERRORS, *([401] if op.auth else [])}
    assert set(responses) == {str(status) for status in expected}
    for status in successes:
        success = responses[str(status)]
        if op.raw_response is not None:  # a download: bytes of any type (but 304's none)
            assert "content" not in success if status == 304 else success["content"]
        elif op.response is None:
            assert "content" not in success
        elif isinstance(op.response, type) and issubclass(op.response, msgspec.Struct):
            assert success["content"]["application/json"]["schema"] == ref(op.response)
    for status in expected - successes:
        assert responses[str(status)]["content"]["application/json"]["schema"] == ref(ErrorResponse)

    if op.auth:
        assert item["security"] == [{"bearerAuth": []}]
    else:
        assert item["security"] == []


def test_register_names_its_structs(document: dict[str, Any]) -> None:
    register = document["paths"]["/register"]["post"]
    assert register["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": SCHEMAS + "RegisterRequest"
    }
    assert register["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": SCHEMAS + "RegisterResponse"
    }
    assert register["responses"]["409"]["content"]["application/json"]["schema"] == {
        "$ref": SCHEMAS + "ErrorResponse"
    }
    assert register["security"] == []
    error = document["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    assert resolve(document, error["properties"]["error"]["$ref"])["required"] == [
        "code",
        "message",
    ]


def test_path_parameters_keep_their_types(document: dict[str, Any]) -> None:
    history = document["paths"]["/history/{chat_id}"]["get"]
    chat_id = next(p for p in history["parameters"] if p["name"] == "chat_id")
    assert chat_id["in"] == "path"
    assert chat_id["schema"]["type"] == "integer"


def test_bearer_auth_is_declared(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }


# --- the document against the real server -----------------------------------------------


@pytest.mark.parametrize("key", OPERATIONS)
async def test_without_a_token_each_operation_answers_as_documented(
    document: dict[str, Any], http: httpx.AsyncClient, key: str
) -> None:
    op = OPERATIONS[key]
    response = await http.request(op.method, sample_path(op))  # no token, no body
    check_response(document, op, response)
    if op.auth:
        assert response.status_code == 401


async def test_real_answers_fit_their_schemas(
    document: dict[str, Any], alice: Api, bob: Api, http: httpx.AsyncClient, database_url: str
) -> None:
    import asyncpg

    conn = await asyncpg.connect(database_url)  # Alice is an admin: /admin answers her too
    try:
        await conn.execute("UPDATE users SET role = 'admin' WHERE id = $1::uuid", alice.user_uuid)
    finally:
        await conn.close()
    auth = {"Authorization": f"Bearer {alice.access_token}"}
    create = OPERATIONS["POST /chats"]
    made = await http.post(
        "/chats", json={"type": "group", "name": "spec", "user_ids": [bob.user_uuid]}, headers=auth
    )
    check_response(document, create, made)
    chat_id = made.json()["id"]
    send = OPERATIONS["POST /chats/{chat_id:int}/messages"]
    sent = await http.post(f"/chats/{chat_id}/messages", json={"text": "hi"}, headers=auth)
    check_response(document, send, sent)
    assert sent.status_code == 201

    # Something in the reports, the audit log and the block list.
    await bob.call("POST", f"/messages/{sent.json()['id']}/report", json={"reason": "test"})
    await alice.call("PATCH", f"/admin/users/{bob.user_uuid}", json={"role": "user"})
    await alice.call("PATCH", f"/admin/users/{bob.user_uuid}", json={"role": "admin"})
    await alice.call("PUT", f"/me/blocks/{bob.user_uuid}")
    bot = await alice.call("POST", "/bots", json={"name": "Spec", "username": "spec_bot"})

    # Every GET route, with real ids, answers a body its documented schema accepts.
    image = io.BytesIO()
    Image.new("RGB", (4, 4)).save(image, "PNG")  # an image: it has a thumbnail too
    upload = await http.post("/uploads", content=image.getvalue(), headers=auth)
    check_response(document, OPERATIONS["POST /uploads"], upload)
    # The app API answers an API key: one, with a chat of the app and a message in it.
    key = await alice.call(
        "POST",
        "/admin/api_keys",
        json={"name": "Spec", "scopes": ["users", "chats", "messages", "history"]},
    )
    app_auth = {"Authorization": f"Bearer {key['key']}"}
    created = await http.post(
        "/app/chats",
        json={"ext_id": "spec-chat", "name": "Spec", "members": ["s1"]},
        headers=app_auth,
    )
    check_response(document, OPERATIONS["POST /app/chats"], created)
    posted = await http.post(
        "/app/chats/spec-chat/messages",
        json={"text": "hi", "client_msg_id": "spec-1", "as_user": "s1"},
        headers=app_auth,
    )
    check_response(document, OPERATIONS["POST /app/chats/{ext_id}/messages"], posted)
    values = {
        "ext_id": "spec-chat",
        "chat_id": chat_id,
        "message_id": sent.json()["id"],
        "user_uuid": bob.user_uuid,
        "file_id": upload.json()["upload_id"],
        "bot_id": bot["bot"]["id"],
    }
    checked = 0
    for op in rest.OPERATIONS:
        if op.method != "GET":
            continue
        names = re.findall(r"\{(\w+)", op.path)
        missing = [name for name in names if name not in values]
        assert not missing, f"give this test a real value for {missing} of {op.path}"
        path = re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: str(values[m[1]]), op.path)
        path += REQUIRED_QUERY.get(op.path, "")
        caller = app_auth if op.path.startswith("/app/") else auth
        response = await http.get(path, headers=caller if op.auth else {})
        assert response.status_code == op.status, (op.path, response.text)
        check_response(document, op, response)
        checked += 1
    assert checked >= 5


# GET routes whose query string has a required field.
REQUIRED_QUERY = {"/search": "?q=hi"}


async def test_schemas_reject_what_the_server_would_not_send(
    document: dict[str, Any], alice: Api
) -> None:
    """The schemas have teeth: a real body with one field broken no longer validates."""
    me = await alice.me()
    schema = document["paths"]["/me"]["get"]["responses"]["200"]["content"]["application/json"]
    check = validator(document, schema["schema"])
    check.validate(me)
    for broken in ({**me, "name": 7}, {k: v for k, v in me.items() if k != "email"}):
        with pytest.raises(jsonschema.ValidationError):
            check.validate(broken)


# --- openapi_document on its own ----------------------------------------------------------


async def _endpoint(request: Any) -> Any:
    raise AssertionError("never called")


def test_path_convertors_become_typed_parameters() -> None:
    op = Operation("GET", "/a/{n:int}/{name}/{owner_uuid}/{f:path}", _endpoint, "s", Health)
    doc = openapi_document([op])
    assert list(doc["paths"]) == ["/a/{n}/{name}/{owner_uuid}/{f}"]
    params = {
        p["name"]: p["schema"]
        for p in doc["paths"]["/a/{n}/{name}/{owner_uuid}/{f}"]["get"]["parameters"]
    }
    assert params["n"] == {"type": "integer", "minimum": 0}
    assert params["name"] == {"type": "string"}
    assert params["owner_uuid"] == {"type": "string", "format": "uuid"}
    assert params["f"] == {"type": "string"}


def test_operation_ids_stay_unique() -> None:
    ops = [
        Operation("GET", "/things", _endpoint, "list", Health, auth=False),
        Operation("POST", "/things", _endpoint, "add", Health, auth=False),
        Operation("DELETE", "/things/{id:int}", _endpoint, "drop", None, 204),
    ]
    doc = openapi_document(ops)
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert ids[0] == "_endpoint"
    assert len(set(ids)) == 3


def test_one_method_and_path_twice_is_refused() -> None:
    ops = [
        Operation("GET", "/x/{a:int}", _endpoint, "one"),
        Operation("GET", "/x/{a}", _endpoint, "two"),
    ]
    with pytest.raises(ValueError, match="two operations"):
        openapi_document(ops)


def test_tagged_any_dict_and_literal_types_are_described() -> None:
    ops = [
        Operation(
            "POST",
            "/sync",
            _endpoint,
            "sync",
            SyncResult,
            body=Sync,
            query=(Param("since", int, "d", required=True),),
            headers=(Param("X-Trace", uuid.UUID, "d"),),
            errors=(422,),
        ),
        Operation("GET", "/ack", _endpoint, "ack", Ack),
        Operation("GET", "/messages", _endpoint, "messages", list[Message]),
        Operation("DELETE", "/ack", _endpoint, "nothing", None, 204, auth=False),
    ]
    doc = openapi_document(ops, title="t", version="9")
    validate(doc, cls=OpenAPIV31SpecValidator)
    for pointer in refs(doc):
        resolve(doc, pointer)
    schemas = doc["components"]["schemas"]
    assert schemas["Ack"]["properties"]["action"] == {"enum": ["ack"]}  # the tag
    assert schemas["Ack"]["properties"]["data"] == {}  # Any
    assert schemas["Sync"]["properties"]["action"] == {"enum": ["sync"]}
    assert schemas["Message"]["properties"]["read_status"] == {"enum": ["read", "unread"]}
    listed = doc["paths"]["/messages"]["get"]["responses"]["200"]["content"]["application/json"]
    assert listed["schema"] == {"type": "array", "items": {"$ref": SCHEMAS + "Message"}}
    sync = doc["paths"]["/sync"]["post"]
    assert [(p["in"], p["required"]) for p in sync["parameters"]] == [
        ("query", True),
        ("header", False),
    ]
    assert sync["parameters"][1]["schema"] == {"type": "string", "format": "uuid"}
    assert doc["paths"]["/ack"]["delete"]["responses"]["204"] == {"description": "No Content"}
    assert doc["info"] == {"title": "t", "version": "9"}


# --- /docs ---------------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.data: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.links.append(value)
            elif name.startswith("data-") and value is not None:
                self.data[name] = value


async def test_docs_is_swagger_ui_served_from_chatd_alone(
    server: Server, http: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    page = await http.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    parser = _Links()
    parser.feed(page.text)
    assert "<script>" not in page.text  # no inline script
    assert len(parser.links) >= 3

    origin = urlsplit(server.base_url)
    kinds = {
        ".js": "javascript",
        ".css": "text/css",
        ".png": "image/png",
        ".json": "application/json",  # asyncapi.json
        "": "text/html",  # docs/socket
    }
    fetched: dict[str, httpx.Response] = {}
    for link in parser.links:
        assert not link.startswith(("http:", "https:", "//")), link
        url = urlsplit(urljoin(str(page.url), link))
        assert (url.scheme, url.netloc) == (origin.scheme, origin.netloc), link
        asset = await http.get(url.path)
        assert asset.status_code == 200, link
        name = url.path.rsplit("/", 1)[-1]
        suffix = name[name.rfind(".") :] if "." in name else ""
        assert kinds[suffix] in asset.headers["content-type"], (link, asset.headers)
        assert asset.content
        fetched[url.path] = asset

    bundle = fetched.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle is not None, list(fetched)
    assert "/docs/assets/swagger-ui.css" in fetched
    # swagger-ui before 5 shows "Unable to render this definition" for an OpenAPI 3.1 one.
    assert b"isOAS31" in bundle.content

    init = fetched["/docs/init.js"]
    assert "SwaggerUIBundle(" in init.text
    assert "persistAuthorization: true" in init.text
    spec_url = urljoin(str(page.url), parser.data["data-openapi-url"])
    assert urlsplit(spec_url).path == "/openapi.json"
    assert (await http.get(spec_url)).json() == document
