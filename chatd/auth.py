"""Passwords (argon2id) and tokens (HS256 JWTs with a pinned algorithm, expiry and type).

Both kinds name the session (one login) they belong to in the `sid` claim. An access
token's signature is checked here without the database; whether its session is still
live is the SessionCache's question (chatd/revocations.py). Refresh tokens are also JWTs,
but each one is recorded (as a SHA-256 hash) so it can be spent exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import secrets
import time
import uuid
from typing import NamedTuple

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ALGORITHM = "HS256"
ACCESS = "access"
REFRESH = "refresh"

# argon2id at OWASP's minimum (m=19 MiB, t=2, p=1): ~20 ms of CPU per hash here.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verifying against this keeps "unknown email" as slow as "wrong password".
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
# Each hash holds 19 MiB while it runs: bound how many run at once.
_hashing = asyncio.Semaphore(4)


async def hash_password(password: str) -> str:
    async with _hashing:
        return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
        except (VerificationError, InvalidHashError):
            return False

    async with _hashing:
        return await asyncio.to_thread(verify)


class InvalidToken(Exception):
    """The token is missing, malformed, badly signed, expired or of the wrong type."""


class Claims(NamedTuple):
    user_id: uuid.UUID
    session_id: uuid.UUID | None  # None: a token minted before sessions existed


def issue_token(
    secret: str, user_id: uuid.UUID, kind: str, ttl: int, session_id: uuid.UUID | None = None
) -> str:
    """A signed token of `kind` for the user's session, valid for at least `ttl` seconds."""
    now = time.time()
    # exp is whole seconds and a token is valid while now < exp: rounding it down would
    # cut up to a second off every token, and a 2-second token could live barely one.
    # Rounded up, it lives ttl to ttl + 1 seconds, so `expires_in` holds.
    exp = math.ceil(now + ttl)
    claims = {"sub": str(user_id), "typ": kind, "iat": int(now), "exp": exp}
    if session_id is not None:
        claims["sid"] = str(session_id)
    if kind == REFRESH:
        claims["jti"] = secrets.token_urlsafe(16)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def read_token(secret: str, token: str, kind: str) -> Claims:
    """Return the user and session a valid token of `kind` names, or raise InvalidToken."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub", "typ"]},
        )
        if claims["typ"] != kind:
            raise InvalidToken(f"not an {kind} token")
        sid = claims.get("sid")
        return Claims(uuid.UUID(claims["sub"]), uuid.UUID(str(sid)) if sid is not None else None)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise InvalidToken(str(exc)) from None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# --- signed file links -------------------------------------------------------------------------
#
# A browser's <img src> sends no Authorization header: POST /files/{id}/link answers URLs
# carrying `expires` and `signature`, an HMAC-SHA256 of the file id and the expiry under a
# key derived from the server's secret (never the token key itself).

FILE_LINK_TTL = 300  # seconds


def _file_link_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"chatd file link v1", hashlib.sha256).digest()


def sign_file_link(secret: str, file_id: uuid.UUID, expires: int) -> str:
    message = f"{file_id}:{expires}".encode()
    return hmac.new(_file_link_key(secret), message, hashlib.sha256).hexdigest()


def check_file_link(secret: str, file_id: uuid.UUID, expires: str, signature: str) -> bool:
    """Whether the link is one this server signed for this file, and has not expired."""
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        return False
    if int(expires) < time.time():
        return False
    return hmac.compare_digest(sign_file_link(secret, file_id, int(expires)), signature)
