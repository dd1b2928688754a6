"""External identity: the app's own JWTs, accepted as chatd access tokens.

An app that embeds chatd already signs its users in. Its backend (or its identity
provider: Keycloak, Auth0, any OIDC provider) issues JWTs, and chatd accepts them on REST
and /connect as it accepts its own access tokens:

- signed with CHATD_AUTH_JWT_SECRET (HS256), or by a key of CHATD_AUTH_JWKS_URL (RS256,
  ES256); the algorithm is pinned by where the key comes from, never by the token alone:
  an HS256 token is checked with the shared secret only, an RS256/ES256 token with the
  JWKS key its `kid` names only, and that key's own algorithm must be the token's. So
  `alg: none` and HS/RS confusion (an RSA public key used as an HMAC secret) are refused;
- `iss` must be CHATD_AUTH_ISSUER, `aud` must name CHATD_AUTH_AUDIENCE; `exp` and `sub`
  are required, `exp`, `nbf` and `iat` are enforced (CHATD_AUTH_LEEWAY seconds of skew);
- the user is keyed by (iss, sub) (table external_identities) and created on first sight;
  the `name` and `picture` claims update the profile when they change.

Which branch a token takes: chatd's own tokens carry no `iss`, so a token whose
(unverified) `iss` is the configured issuer is verified here, every other one as chatd's
own. Each branch verifies fully with its own keys, so peeking decides nothing about trust.

No session row is written per request, and none exists: such a token cannot be signed out
on its own. It lives until its `exp` (keep them short, as providers do), and the user as
a whole is cut off by disabling or deleting the account, which publishes a revocation of
all the user's sessions: the SessionCache then forgets the user's "active" answer and the
next request reads the account again (chatd/revocations.py `is_active`), and the hub
closes the user's sockets.

The JWKS is fetched at start, cached, fetched again for a `kid` it does not hold and when
older than CHATD_AUTH_JWKS_MAX_AGE, but never more often than once per
CHATD_AUTH_JWKS_MIN_REFRESH seconds: tokens with made-up kids cannot make chatd hammer the
provider. The JWKS URL is the operator's, so it is fetched without the SSRF check of
user-given URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import jwt
import msgspec

from chatd import app_hooks, metrics
from chatd.config import Settings
from chatd.protocol import (
    MAX_USER_NAME_CHARS,
    UNAUTHORIZED,
    UNAVAILABLE,
    ChatError,
    Event,
    Member,
    UserUpdated,
)
from chatd.revocations import SessionCache
from chatd.store import contacts_of

log = logging.getLogger("chatd.identity")

HS256 = "HS256"
# The algorithm each kind of JWKS key verifies with (RFC 7518); no other key is used.
_KEY_ALGORITHMS = {("RSA", None): "RS256", ("EC", "P-256"): "ES256"}
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 100
JWKS_TIMEOUT = 5.0
MAX_SUBJECT_CHARS = 255
MAX_PICTURE_CHARS = 2048
# (iss, sub) -> the user and the claims last applied; one entry is a few hundred bytes.
MAX_CACHED_USERS = 100_000

REFUSED = "invalid or expired access token"


class IdentityUnavailable(Exception):
    """The provider's keys could not be fetched: the token may be good; retry later."""


@dataclass(frozen=True, slots=True)
class External:
    """What a verified token says about its user."""

    issuer: str
    subject: str
    name: str | None
    picture: str | None


def issuer_of(token: str) -> Any:
    """The token's `iss`, unverified (None when it is no JWT or has none)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except (jwt.PyJWTError, AttributeError):
        return None


# --- the provider's keys ---------------------------------------------------------------------


class Jwks:
    """The keys CHATD_AUTH_JWKS_URL publishes, by kid: (algorithm, key)."""

    def __init__(
        self, url: str, min_refresh: float, max_age: float, http: httpx.AsyncClient
    ) -> None:
        self.url = url
        self.min_refresh = min_refresh
        self.max_age = max_age
        self._http = http
        self._keys: dict[str, tuple[str, Any]] = {}
        self._fetched_at: float | None = None  # monotonic, the last fetch that worked
        self._tried_at: float | None = None  # monotonic, the last fetch at all
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> tuple[str, Any] | None:
        """The key `kid` names, fetching the set again when it is unknown or old (at
        most once per min_refresh). IdentityUnavailable when no set was ever fetched."""
        now = time.monotonic()
        stale = self._fetched_at is None or now - self._fetched_at > self.max_age
        if kid not in self._keys or stale:
            await self.refresh()
        if self._fetched_at is None:
            raise IdentityUnavailable("the identity provider's keys could not be fetched")
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Fetch the set unless one was tried less than min_refresh ago. A failed fetch
        keeps the keys held (an outage of the provider does not sign everyone out)."""
        async with self._lock:  # the requests that wait for one fetch take its result
            now = time.monotonic()
            if self._tried_at is not None and now - self._tried_at < self.min_refresh:
                return
            self._tried_at = now
            try:
                self._keys = await self._fetch()
            except Exception as exc:
                metrics.JWKS_FETCHES.labels("failed").inc()
                log.warning("fetching the JWKS at %s failed: %r", self.url, exc)
                return
            metrics.JWKS_FETCHES.labels("ok").inc()
            self._fetched_at = time.monotonic()

    async def _fetch(self) -> dict[str, tuple[str, Any]]:
        async with self._http.stream("GET", self.url) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the JWKS is over {MAX_JWKS_BYTES} bytes")
        document = msgspec.json.decode(body)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS: no keys list")
        return parse_keys(document["keys"][:MAX_JWKS_KEYS])


def parse_keys(raw_keys: Iterable[Any]) -> dict[str, tuple[str, Any]]:
    """The usable signing keys of a JWKS: RSA (2048 bits or more) and EC P-256 keys with
    a kid, each with the one algorithm it verifies. Symmetric keys ("oct"), encryption
    keys, and keys whose declared alg is not their type's are left out."""
    keys: dict[str, tuple[str, Any]] = {}
    for raw in raw_keys:
        if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str):
            continue
        if raw.get("use", "sig") != "sig":
            continue
        algorithm = _KEY_ALGORITHMS.get((raw.get("kty"), raw.get("crv")))
        if algorithm is None or raw.get("alg", algorithm) != algorithm:
            continue
        try:
            key = jwt.PyJWK(raw, algorithm).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if algorithm == "RS256" and key.key_size < MIN_RSA_BITS:
            continue
        keys[raw["kid"]] = (algorithm, key)
    return keys


# --- verifying ---------------------------------------------------------------------------------


class Verifier:
    """Checks the app's JWTs (module docstring); knows nothing of users."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        assert settings.auth_issuer and settings.auth_audience
        self.issuer = settings.auth_issuer
        self.audience = settings.auth_audience
        self.secret = settings.auth_jwt_secret
        self.leeway = settings.auth_leeway
        self.jwks = (
            Jwks(
                settings.auth_jwks_url,
                settings.auth_jwks_min_refresh,
                settings.auth_jwks_max_age,
                http,
            )
            if settings.auth_jwks_url
            else None
        )

    async def verify(self, token: str) -> External:
        """The token's identity; InvalidExternal when it is not a good token of the
        issuer for the audience, IdentityUnavailable when the keys cannot be had."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidExternal(str(exc)) from None
        algorithm = header.get("alg")
        if algorithm == HS256 and self.secret:
            key: Any = self.secret
        elif algorithm in ("RS256", "ES256") and self.jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid or len(kid) > 256:
                raise InvalidExternal("no kid")
            found = await self.jwks.key(kid)
            if found is None:
                raise InvalidExternal("unknown kid")
            key_algorithm, key = found
            if key_algorithm != algorithm:  # an EC key's token claiming RS256, say
                raise InvalidExternal("the key's algorithm is not the token's")
        else:
            raise InvalidExternal(f"algorithm {algorithm!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidExternal(str(exc)) from None
        subject = claims["sub"]
        # Printable: no NUL (PostgreSQL's text refuses it) nor lone surrogates (no UTF-8).
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
            raise InvalidExternal("sub must be a string of 1..255 characters")
        if not subject.isprintable():
            raise InvalidExternal("sub must be printable text")
        return External(self.issuer, subject, _name_of(claims), _picture_of(claims.get("picture")))


class InvalidExternal(Exception):
    """Not a good token of the configured issuer."""


def _name_of(claims: dict[str, Any]) -> str | None:
    """The display name: `name`, else `preferred_username` (Keycloak), else `nickname`
    (Auth0); cleaned and cut to chatd's limit rather than refused (a provider's odd
    profile must not lock its user out)."""
    for claim in ("name", "preferred_username", "nickname"):
        value = claims.get(claim)
        if isinstance(value, str):
            cleaned = " ".join("".join(c for c in value if c.isprintable()).split())
            if cleaned:
                return cleaned[:MAX_USER_NAME_CHARS]
    return None


def _picture_of(value: Any) -> str | None:
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        if len(value) <= MAX_PICTURE_CHARS and value.isprintable():
            return value
    return None


# --- users -------------------------------------------------------------------------------------

_FIND = """
SELECT user_id, name, picture FROM external_identities WHERE issuer = $1 AND subject = $2
"""

_CREATE_USER = """
INSERT INTO users (id, name, email, password_hash)
VALUES ($1::uuid, $2, 'ext-' || $1::uuid::text || '@external.invalid', '!')
"""

_CREATE_IDENTITY = """
INSERT INTO external_identities (issuer, subject, user_id, name, picture)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (issuer, subject) DO NOTHING
RETURNING user_id
"""

# The provider's claims changed: the name follows them (unless none is given).
_APPLY = """
WITH identity AS (
    UPDATE external_identities SET name = $3, picture = $4
    WHERE issuer = $1 AND subject = $2 RETURNING user_id
)
UPDATE users u SET name = coalesce($3, u.name)
FROM identity WHERE u.id = identity.user_id AND u.deleted_at IS NULL
RETURNING u.id, u.name, u.avatar,
          (SELECT name FROM users WHERE id = u.id) IS DISTINCT FROM u.name AS renamed
"""

DEFAULT_NAME = "User"

Publish = Callable[[Iterable[uuid.UUID], Event], Awaitable[None]]


class Identities:
    """node.identity: the app's tokens become chatd users.

    `authenticate(token)` verifies (Verifier), finds or creates the user of (iss, sub)
    and applies changed name/picture claims; from memory once this process knows the
    user and the claims did not change (no query per request).
    """

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, sessions: SessionCache, publish: Publish
    ) -> None:
        self._http = httpx.AsyncClient(
            timeout=JWKS_TIMEOUT, follow_redirects=False, headers={"User-Agent": "chatd"}
        )
        self.verifier = Verifier(settings, self._http)
        self.issuer = settings.auth_issuer
        self._pool = pool
        self._sessions = sessions
        self._publish = publish
        self._known: OrderedDict[tuple[str, str], tuple[uuid.UUID, str | None, str | None]] = (
            OrderedDict()
        )
        self._prefetch: asyncio.Task[None] | None = None

    @staticmethod
    def configured(settings: Settings) -> bool:
        return bool(settings.auth_jwt_secret or settings.auth_jwks_url)

    def start(self) -> None:
        if self.verifier.jwks is not None:  # the keys before the first token needs them
            self._prefetch = asyncio.create_task(self.verifier.jwks.refresh())

    async def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._prefetch
        await self._http.aclose()

    def claims(self, token: str) -> bool:
        """Whether the token says it is the configured issuer's (then only this verifies it)."""
        return issuer_of(token) == self.issuer

    async def authenticate(self, token: str) -> uuid.UUID:
        """The user of a good token of the issuer; `unauthorized` for a bad one or a
        disabled or deleted user, `unavailable` when the provider's keys cannot be had."""
        try:
            external = await self.verifier.verify(token)
        except InvalidExternal:
            raise ChatError(UNAUTHORIZED, REFUSED) from None
        except IdentityUnavailable:
            raise ChatError(
                UNAVAILABLE, "the identity provider's keys cannot be fetched; retry"
            ) from None
        user_id = await self.user_of(external)
        if not await self._sessions.is_active(user_id):
            raise ChatError(UNAUTHORIZED, "this account is disabled or deleted")
        return user_id

    async def user_of(self, external: External) -> uuid.UUID:
        """The user of (iss, sub), created on first sight; its profile brought up to
        date when the name or picture claim changed."""
        key = (external.issuer, external.subject)
        known = self._known.get(key)
        if known is not None:
            user_id, *applied = known  # applied: [name, picture]
            if _wanted(external, applied) == applied:
                self._known.move_to_end(key)
                return user_id
        for _ in range(2):  # a first sight raced by another: read what it created
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(_FIND, *key)
                if row is None:
                    try:
                        user_id = await self._create(conn, external)
                    except _Raced:
                        continue
                    applied = [external.name, external.picture]
                else:
                    user_id, applied = row["user_id"], [row["name"], row["picture"]]
                    wanted = _wanted(external, applied)
                    if wanted != applied:
                        await self._apply(conn, external, wanted)
                        applied = wanted
            break
        else:
            raise ChatError(UNAVAILABLE, "the user is being created; retry")
        self._known[key] = (user_id, applied[0], applied[1])
        self._known.move_to_end(key)
        if len(self._known) > MAX_CACHED_USERS:
            self._known.popitem(last=False)
        return user_id

    async def _create(self, conn: asyncpg.Connection, external: External) -> uuid.UUID:
        user_id = uuid.uuid4()
        async with conn.transaction():
            await conn.execute(_CREATE_USER, user_id, external.name or DEFAULT_NAME)
            created = await conn.fetchval(
                _CREATE_IDENTITY,
                external.issuer,
                external.subject,
                user_id,
                external.name,
                external.picture,
            )
            if created is None:  # another request created it first: the user row goes
                raise _Raced
            member = Member(user_uuid=str(user_id), name=external.name or DEFAULT_NAME, avatar=None)
            await app_hooks.enqueue_user_created(conn, member)
        return user_id

    async def _apply(
        self, conn: asyncpg.Connection, external: External, wanted: list[str | None]
    ) -> None:
        row = await conn.fetchrow(_APPLY, external.issuer, external.subject, *wanted)
        if row is not None and row["renamed"]:
            contacts = await contacts_of(conn, row["id"])
            member = Member(
                user_uuid=str(row["id"]),
                name=row["name"],
                avatar=None if row["avatar"] is None else str(row["avatar"]),
            )
            await self._publish({row["id"], *contacts}, UserUpdated(member))


def _wanted(external: External, applied: list[str | None]) -> list[str | None]:
    """The name and picture the profile should have: a claim left out of a token (an
    access token may carry fewer than an ID token) leaves what was applied before."""
    return [external.name or applied[0], external.picture or applied[1]]


class _Raced(Exception):
    pass
