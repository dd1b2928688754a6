"""A real identity provider for tests: a JWKS endpoint on a free port, and its signing keys.

    with IdentityProvider() as idp:             # uvicorn in a thread of the test process
        env = idp.server_env()                  # CHATD_AUTH_* for a chatd server
        token = idp.token("alice")              # RS256 by the current key
        idp.rotate()                            # a new current key, published beside the old
        idp.withdraw(old_kid)                   # the old one no longer published

It runs in a thread of its own (not the test's event loop) so one provider serves a whole
module's or session's chatd servers across tests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import free_port

ISSUER = "https://idp.example.test/realms/product"
AUDIENCE = "chatd"
SHARED_SECRET = "shared-app-secret-" + "z" * 40


@dataclass
class Key:
    kid: str
    algorithm: str  # RS256 or ES256
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algo = (
            jwt.algorithms.RSAAlgorithm if self.algorithm == "RS256" else jwt.algorithms.ECAlgorithm
        )
        jwk = json.loads(algo.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_key(algorithm: str = "RS256") -> Key:
    if algorithm == "RS256":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    return Key(f"{algorithm.lower()}-{uuid.uuid4().hex[:8]}", algorithm, private)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT put together by hand (PyJWT refuses to make the hostile ones): HMAC-SHA256
    with `hmac_key`, or no signature at all when it is None."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if hmac_key is None:
        return signing_input + "."
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@dataclass
class IdentityProvider:
    keys: list[Key] = field(default_factory=lambda: [new_key("RS256"), new_key("ES256")])
    published: set[str] = field(default_factory=set)
    fetches: int = 0
    status: int = 200  # what GET /jwks answers (503: the provider is down)

    def __post_init__(self) -> None:
        self.published = {k.kid for k in self.keys}
        self.port = free_port()
        app = Starlette(routes=[Route("/jwks", self._jwks)])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    async def _jwks(self, request: Request) -> JSONResponse:
        self.fetches += 1
        if self.status != 200:
            return JSONResponse({"error": "down"}, self.status)
        return JSONResponse(
            {"keys": [k.public_jwk() for k in self.keys if k.kid in self.published]}
        )

    def server_env(self, *, secret: bool = True, jwks: bool = True, **extra: str) -> dict[str, str]:
        env = {"CHATD_AUTH_ISSUER": ISSUER, "CHATD_AUTH_AUDIENCE": AUDIENCE, **extra}
        if secret:
            env["CHATD_AUTH_JWT_SECRET"] = SHARED_SECRET
        if jwks:
            env["CHATD_AUTH_JWKS_URL"] = self.jwks_url
        return env

    def key(self, algorithm: str = "RS256") -> Key:
        """The newest published key of `algorithm`."""
        return next(
            k for k in reversed(self.keys) if k.algorithm == algorithm and k.kid in self.published
        )

    def claims(self, subject: str, ttl: int = 300, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "iat": now,
            "exp": now + ttl,
            **extra,
        }

    def token(
        self, subject: str, algorithm: str = "RS256", *, key: Key | None = None, **claims: Any
    ) -> str:
        """A token for `subject`: signed by the newest key of `algorithm` (RS256, ES256),
        or with the shared secret (HS256); `claims` added or overriding."""
        ttl = claims.pop("ttl_seconds", 300)
        body = {**self.claims(subject, ttl), **claims}
        if algorithm == "HS256":
            return jwt.encode(body, SHARED_SECRET, "HS256")
        key = key or self.key(algorithm)
        return jwt.encode(body, key.private, algorithm, headers={"kid": key.kid})

    def rotate(self, algorithm: str = "RS256") -> Key:
        key = new_key(algorithm)
        self.keys.append(key)
        self.published.add(key.kid)
        return key

    def withdraw(self, kid: str) -> None:
        self.published.discard(kid)

    def __enter__(self) -> IdentityProvider:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the JWKS server did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            self._thread.join(5)
