"""Fuzz every REST route from the server's own /openapi.json with schemathesis (v4).

For each operation the document describes, schemathesis generates requests from its
schemas, valid ones and invalid ones, sends them with a real user's access token to the
real server, and checks that the answer:

- is never a 5xx (not_a_server_error);
- has a status the document lists for that operation (status_code_conformance), with the
  content type it promises (content_type_conformance);
- has a body that matches the response schema of that status (response_schema_conformance);

Each operation is fuzzed with valid data (positive mode) and with data that breaks its
schema (negative mode): wrong types, out-of-range numbers, missing and extra fields.
schemathesis's negative_data_rejection check is left out on purpose: it wants every
schema-breaking request refused, but chatd ignores unknown query parameters (as most HTTP
APIs do) and answers an oversized body with 413, which that check does not expect. A 5xx
or an undocumented status or body for invalid data still fails the test.

So the document is checked against what the server does, not only against itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chatd import rest
from chatd.client import Api
from tests.conftest import ACCOUNT_ENDING, PASSWORD, SESSION_ENDING, Server
from tests.test_openapi import openapi_path

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Framing headers belong to HTTP, not to the API: a generated `content-length: x` is refused
# by uvicorn's parser (a plain-text 400) before chatd sees the request.
FRAMING_HEADERS = {"content-length", "transfer-encoding", "host", "connection"}


@pytest.fixture(scope="module")
def fuzzer(server: Server) -> Api:
    """A user with a group and a message, so small generated ids sometimes exist."""

    async def make() -> Api:
        api = Api(server.base_url)
        email = f"fuzzer-{id(api)}@example.com"
        await api.register("Fuzzer", email, PASSWORD)
        await api.login(email, PASSWORD)
        api.email = email  # type: ignore[attr-defined]
        chat = await api.call("POST", "/chats", json={"type": "group", "name": "F", "user_ids": []})
        await api.call("POST", f"/chats/{chat['id']}/messages", json={"text": "hello"})
        return api

    return asyncio.run(make())


@pytest.fixture(scope="module")
def api_schema(server: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json")


# Parametrized from chatd's own route table (the pytest plugin's lazy schema does not run
# under pytest 9), so a new route is fuzzed without editing this file.
OPERATIONS = sorted((op.method, openapi_path(op)) for op in rest.OPERATIONS)
# Negative cases need something to break: a parameter, a header or a body.
TAKING_INPUT = [
    (op.method, openapi_path(op))
    for op in rest.OPERATIONS
    if op.query or op.headers or op.body is not None or "{" in op.path
]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in sorted(TAKING_INPUT)
]
FUZZ = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_rest_matches_its_openapi_document(
    api_schema: schemathesis.BaseSchema, fuzzer: Api, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    token = fuzzer.access_token
    ends_session = any(
        (op.method, openapi_path(op)) == (method, path)
        and f"{op.method} {op.path}" in SESSION_ENDING | ACCOUNT_ENDING
        for op in rest.OPERATIONS
    )

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        if case.headers:
            case.headers = {
                k: v for k, v in case.headers.items() if k.lower() not in FRAMING_HEADERS
            }
        # A route that ends the session (or account) gets a user of its own each time.
        bearer = fresh_token(fuzzer) if ends_session else token
        case.call_and_validate(
            headers={"Authorization": f"Bearer {bearer}"}, checks=CHECKS, timeout=30
        )

    fuzz()


def fresh_token(api: Api) -> str:
    """A new user's token (the fuzzer's own email may be locked by fuzzed wrong passwords
    of /me/password and DELETE /me, which count as failed logins)."""
    email = f"ended-{uuid.uuid4().hex[:10]}@example.com"
    body = {"name": "Ended", "email": email, "password": PASSWORD}
    httpx.post(api.base_url + "/register", json=body, timeout=30).raise_for_status()
    response = httpx.post(api.base_url + "/login", json=body, timeout=30)
    response.raise_for_status()
    return response.json()["access_token"]


@pytest.fixture(autouse=True)
def no_tracebacks(server: Server) -> Iterator[None]:
    start = len(server.log())
    yield
    assert "Traceback" not in server.log()[start:]
