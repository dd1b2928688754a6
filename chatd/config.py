"""Settings, read once from the environment (every variable is documented in README.md).

Each setting is one field of `Settings`, written once with its default and, for most, its
CHATD_* variable: `Settings.from_env` reads every variable of that table. Read by hand in
`from_env`: CHATD_SECRET (else one generated into the data folder) and
CHATD_MESSAGE_BURST (the burst of CHATD_MESSAGE_RATE).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("chatd")

DEFAULT_DATA_DIR = ".chatd"
MIN_SECRET_CHARS = 32
MAX_SEND_LINGER_MS = 1000  # the longest a send is held back for others to share its commit
_WEAK_SECRETS = {"secret", "changeme", "change-me", "password", "chatd", "development", "test"}


# --- rates -------------------------------------------------------------------------------

_UNITS = {
    **dict.fromkeys(("s", "sec", "second"), 1),
    **dict.fromkeys(("m", "min", "minute"), 60),
    **dict.fromkeys(("h", "hour"), 3600),
    **dict.fromkeys(("d", "day"), 86400),
}
# The unit's plural ("2days", "15mins") only for the words, so "10/ms" is no rate.
_RATE = re.compile(r"(\d+)\s*/\s*(\d*)\s*(s|m|h|d|(?:sec|second|min|minute|hour|day)s?)")


@dataclass(frozen=True)
class Rate:
    """`count` events per `period` seconds, of which up to `burst` may come at once."""

    count: int
    period: float
    burst: int

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s (burst {self.burst})"


def parse_rate(text: str, burst: int | None = None) -> Rate | None:
    """'10/min', '5/s', '100/15min', '20/h', '1000/day' → a Rate; 'off', 'none', '0' → None.

    Without `burst`, the whole `count` may come at once (then one per period/count).
    """
    text = text.strip().lower()
    if text in ("off", "none", "0", "unlimited"):
        return None
    match = _RATE.fullmatch(text)
    unit = _UNITS.get(match.group(3).removesuffix("s") or "s") if match else None
    if match is None or unit is None:
        raise ValueError(f"{text!r} is not a rate like 10/min, 5/s, 100/15min, 20/day or off")
    count, periods = int(match.group(1)), int(match.group(2) or 1)
    if count <= 0 or periods <= 0:
        raise ValueError(f"{text!r}: count and period must be positive (or use off)")
    return Rate(count, float(periods * unit), burst or count)


# --- reading variables -------------------------------------------------------------------

Env = Mapping[str, str]
Reader = Callable[[Env, str, Any], Any]  # (environment, variable, default) -> value


def _int(env: Env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise SystemExit(f"{name} must be positive, got {value}")
    return value


def _non_negative(env: Env, name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    return 0 if raw == "0" else _int(env, name, default)


def _send_linger(env: Env, name: str, default: int) -> int:
    value = _non_negative(env, name, default)
    if value > MAX_SEND_LINGER_MS:
        raise SystemExit(f"{name} must be at most {MAX_SEND_LINGER_MS} (ms), got {value}")
    return value


def _str(env: Env, name: str, default: str) -> str:
    return env.get(name, default).strip()


def _optional(env: Env, name: str, default: str | None) -> str | None:
    return env.get(name) or default


def _files_url(env: Env, name: str, default: str | None) -> str | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    scheme, _, rest = raw.partition("://")
    if scheme != "s3" or not rest.split("/", 1)[0]:
        raise SystemExit(f"{name} must be unset (local files) or s3://bucket[/prefix], got {raw!r}")
    return raw


def _bool(env: Env, name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"{name} must be true or false, got {raw!r}")


def _rate(env: Env, name: str, default: Rate | None) -> Rate | None:
    """`name` as a rate ("10/min", "off")."""
    raw = env.get(name, "").strip()
    try:
        return parse_rate(raw) if raw else default
    except ValueError as exc:
        raise SystemExit(f"{name}: {exc}") from None


def _deleted_user_messages(env: Env, name: str, default: str) -> str:
    value = env.get(name, default).strip().lower()
    if value not in ("keep", "erase"):
        raise SystemExit(f"{name} must be keep or erase, got {value!r}")
    return value


def _cap(env: Env, name: str, default: int | None) -> int | None:
    """A positive integer, or 0 / off for no cap."""
    raw = env.get(name, "").strip().lower()
    if raw in ("0", "off", "none", "unlimited"):
        return None
    return _int(env, name, default)  # type: ignore[arg-type]


def _origins(env: Env, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")


def _embed_origins(env: Env, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Origins (scheme://host[:port]), each a source of a CSP header: nothing else."""
    origins = _origins(env, name, default)
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise SystemExit(f"{name}: {origin!r} is not an origin like https://app.example.com")
    return origins


def _path(env: Env, name: str, default: Path) -> Path:
    return Path(env[name]) if env.get(name) else default


def setting(variable: str, default: Any, read: Reader = _int) -> Any:
    """A Settings field read from `variable` (by `read`), `default` when it is unset."""
    return dataclasses.field(default=default, metadata={"env": variable, "read": read})


def _log_level(env: Env, name: str, default: str) -> str:
    level = env.get(name, default).lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise SystemExit(f"{name} must be debug, info, warning or error, got {level!r}")
    return level


def _log_format(env: Env, name: str, default: str) -> str:
    """JSON lines by default; console lines in dev mode (CHATD_DEV)."""
    log_format = env.get(name, "").lower() or ("console" if _bool(env, "CHATD_DEV") else default)
    if log_format not in ("json", "console"):
        raise SystemExit(f"{name} must be json or console, got {log_format!r}")
    return log_format


@dataclass(frozen=True, kw_only=True)
class Settings:
    # The signing key of tokens: from CHATD_SECRET, else generated once into data_dir.
    secret: str
    database_url: str | None = setting("CHATD_DATABASE_URL", None, _optional)
    dev: bool = setting("CHATD_DEV", False, _bool)  # development: tolerates a weak secret
    redis_url: str | None = setting("CHATD_REDIS_URL", None, _optional)
    workers: int = setting("CHATD_WORKERS", 1)
    host: str = setting("CHATD_HOST", "127.0.0.1", _str)
    port: int = setting("CHATD_PORT", 8000)
    data_dir: Path = setting("CHATD_DATA_DIR", Path(DEFAULT_DATA_DIR), _path)
    access_token_ttl: int = setting("CHATD_ACCESS_TOKEN_TTL", 15 * 60)
    refresh_token_ttl: int = setting("CHATD_REFRESH_TOKEN_TTL", 7 * 24 * 3600)
    # Frames over this are refused (1009); not a variable.
    max_frame_bytes: int = 64 * 1024
    # Off by default: per-socket compression state costs ~35 KiB and CPU on every frame.
    ws_deflate: bool = setting("CHATD_WS_DEFLATE", False, _bool)
    # Browser origins allowed to open /connect besides the server's own ("*": any).
    allowed_origins: tuple[str, ...] = setting("CHATD_ALLOWED_ORIGINS", (), _origins)
    send_queue_size: int = setting("CHATD_SEND_QUEUE_SIZE", 1024)
    # Seconds a socket may go without accepting a frame before it is closed (1013).
    write_timeout: int = setting("CHATD_WRITE_TIMEOUT", 10)
    # Bytes the transport may hold for one socket's peer, pongs included (1008 past it).
    socket_buffer_bytes: int = setting("CHATD_SOCKET_BUFFER_BYTES", 4 * 1024 * 1024)
    # Seconds a connection has to send a request's headers; seconds an idle keep-alive
    # HTTP connection stays open.
    header_timeout: int = setting("CHATD_HEADER_TIMEOUT", 10)
    keepalive_timeout: int = setting("CHATD_KEEPALIVE_TIMEOUT", 5)
    db_pool_size: int = setting("CHATD_DB_POOL_SIZE", 20)
    # Seconds a database connect or statement may take before it fails as `unavailable`.
    db_timeout: int = setting("CHATD_DB_TIMEOUT", 10)
    # Milliseconds between the starts of two send batches, at least, once the writer is
    # under load (0: none). Sends that come sooner wait and share one commit: less CPU per
    # message under load, for up to this much more latency (docs/performance.md). A light
    # load, and a send after a quiet spell, never wait.
    send_linger_ms: int = setting("CHATD_SEND_LINGER_MS", 5, _send_linger)
    log_level: str = setting("CHATD_LOG_LEVEL", "info", _log_level)
    log_format: str = setting("CHATD_LOG_FORMAT", "json", _log_format)  # or "console": logs.py
    # SIGTERM: seconds to finish the sends in flight and close every socket before exiting.
    shutdown_grace: int = setting("CHATD_SHUTDOWN_GRACE", 10)
    # Rate limits (None: off). Failed logins count per email and per client address.
    login_email_rate: Rate | None = setting("CHATD_LOGIN_EMAIL_RATE", parse_rate("10/15min"), _rate)
    login_ip_rate: Rate | None = setting("CHATD_LOGIN_IP_RATE", parse_rate("100/15min"), _rate)
    register_rate: Rate | None = setting(  # per client address
        "CHATD_REGISTER_RATE", parse_rate("20/h"), _rate
    )
    # Per user; its burst is CHATD_MESSAGE_BURST (from_env).
    message_rate: Rate | None = setting("CHATD_MESSAGE_RATE", parse_rate("10/s", 30), _rate)
    # Per user: edits, deletes, reactions and pins together (sends and forwards are messages).
    change_rate: Rate | None = setting("CHATD_CHANGE_RATE", parse_rate("10/s", 30), _rate)
    # Per user: searches (socket and REST together), each up to a few thousand messages tested.
    search_rate: Rate | None = setting("CHATD_SEARCH_RATE", parse_rate("5/s", 20), _rate)
    typing_rate: Rate | None = setting(  # per user, on top of the per-chat TypingGate
        "CHATD_TYPING_RATE", parse_rate("10/10s"), _rate
    )
    max_sockets_per_user: int | None = setting(
        "CHATD_MAX_SOCKETS_PER_USER", 20, _cap
    )  # oldest closed
    create_chat_rate: Rate | None = setting(  # per user, private and group
        "CHATD_CREATE_CHAT_RATE", parse_rate("60/h"), _rate
    )
    add_members_rate: Rate | None = setting(  # per user, counting users added, not calls
        "CHATD_ADD_MEMBERS_RATE", parse_rate("1000/day"), _rate
    )
    # Requests per API key of the app API (/app/..., chatd/handlers/app.py).
    app_key_rate: Rate | None = setting("CHATD_APP_KEY_RATE", parse_rate("100/s"), _rate)
    # Groups a user creates in any 24 h, counted in the database.
    groups_per_day: int | None = setting("CHATD_GROUPS_PER_DAY", 100, _cap)
    # A sync that would replay more changes than this in one chat answers too_long.
    sync_max_changes: int = setting("CHATD_SYNC_MAX_CHANGES", 1000)
    # DELETE /me: keep the account's messages (from "Deleted account") or erase them.
    deleted_user_messages: str = setting(
        "CHATD_DELETED_USER_MESSAGES", "keep", _deleted_user_messages
    )
    # Files (chatd/files.py): their bytes live in $CHATD_DATA_DIR/files, or, with
    # s3://bucket/prefix, in an S3-compatible bucket (credentials: the standard AWS_*
    # variables). Uploads are received in $CHATD_DATA_DIR/files/tmp either way.
    files_url: str | None = setting("CHATD_FILES_URL", None, _files_url)
    # An S3-compatible service other than AWS (MinIO, Ceph, R2...): its URL.
    s3_endpoint_url: str | None = setting("CHATD_S3_ENDPOINT_URL", None, _optional)
    # An upload over this is refused (413) as soon as the body crosses it.
    max_upload_bytes: int = setting("CHATD_MAX_UPLOAD_BYTES", 25 * 1024 * 1024)
    # The bytes of a user's uploads together (each upload counts, even of the same bytes).
    user_quota_bytes: int = setting("CHATD_USER_QUOTA_BYTES", 1024 * 1024 * 1024)
    # Seconds an upload may wait to be attached before the collector deletes it.
    upload_ttl: int = setting("CHATD_UPLOAD_TTL", 24 * 3600)
    # Seconds a file is kept after it was last attached, and bytes after they were last
    # uploaded, before the collector may delete what nothing refers to: longer than any
    # send or upload takes, so one in flight never loses its file.
    file_grace: int = setting("CHATD_FILE_GRACE", 600)
    # Seconds between two rounds of the file collector.
    file_gc_interval: int = setting("CHATD_FILE_GC_INTERVAL", 300)
    # Presence events go to the members of private chats and of groups up to this size;
    # bigger groups ask (get_presence).
    presence_group_limit: int = setting("CHATD_PRESENCE_GROUP_LIMIT", 100)
    # The delivery queue (chatd/deliveries.py): webhooks and pushes chatd POSTs elsewhere.
    # Attempts one process makes at once; seconds one may take.
    delivery_concurrency: int = setting("CHATD_DELIVERY_CONCURRENCY", 8)
    delivery_timeout: int = setting("CHATD_DELIVERY_TIMEOUT", 10)
    # Milliseconds before the first retry, doubling after each failure (capped at 1 h).
    delivery_retry_ms: int = setting("CHATD_DELIVERY_RETRY_MS", 2000)
    # Attempts before a delivery is given up on (dead-lettered): about 2 h of retries.
    delivery_max_attempts: int = setting("CHATD_DELIVERY_MAX_ATTEMPTS", 12)
    # Pending deliveries one receiver may have; the oldest past it are dead-lettered.
    delivery_max_pending: int = setting("CHATD_DELIVERY_MAX_PENDING", 10_000)
    # Seconds delivered and dead deliveries stay listed before they are deleted.
    delivery_retention: int = setting("CHATD_DELIVERY_RETENTION", 3 * 86400)
    # Whether user-given URLs (webhooks, push endpoints) may point at loopback or private
    # addresses. Off: no one can make chatd reach its own network (SSRF).
    outbound_allow_private: bool = setting("CHATD_OUTBOUND_ALLOW_PRIVATE", False, _bool)
    # Web Push (chatd/push.py): the VAPID private key (PEM, or the raw scalar in base64url);
    # unset: one generated into the data folder. Every node must share it.
    vapid_private_key: str | None = setting("CHATD_VAPID_PRIVATE_KEY", None, _optional)
    # Who runs this server, for push services (RFC 8292 "sub"): a mailto: or https: URL.
    vapid_subject: str = setting("CHATD_VAPID_SUBJECT", "mailto:chatd@localhost", _str)
    # The push gateway: notifications POSTed there, signed with CHATD_PUSH_GATEWAY_SECRET
    # (HMAC-SHA256, chatd/signing.py), for an operator's relay to FCM/APNs.
    push_gateway_url: str | None = setting("CHATD_PUSH_GATEWAY_URL", None, _optional)
    push_gateway_secret: str | None = setting("CHATD_PUSH_GATEWAY_SECRET", None, _optional)
    # Whether the gateway's notifications carry the message's text (off: metadata only).
    push_gateway_text: bool = setting("CHATD_PUSH_GATEWAY_TEXT", False, _bool)
    # External identity (chatd/identity.py): the app's own JWTs accepted as access tokens,
    # signed with a shared secret (HS256) and/or by keys published at a JWKS URL (RS256,
    # ES256). Either needs the issuer and audience every token must name.
    auth_jwt_secret: str | None = setting("CHATD_AUTH_JWT_SECRET", None, _optional)
    auth_jwks_url: str | None = setting("CHATD_AUTH_JWKS_URL", None, _optional)
    auth_issuer: str | None = setting("CHATD_AUTH_ISSUER", None, _optional)
    auth_audience: str | None = setting("CHATD_AUTH_AUDIENCE", None, _optional)
    # Seconds between two fetches of the JWKS at least (an unknown kid asks again only
    # then: tokens with made-up kids cannot make chatd hammer the identity provider), and
    # at most (so a key the provider withdrew stops being trusted).
    auth_jwks_min_refresh: int = setting("CHATD_AUTH_JWKS_MIN_REFRESH", 60)
    auth_jwks_max_age: int = setting("CHATD_AUTH_JWKS_MAX_AGE", 3600)
    # Seconds of clock difference tolerated on exp, nbf and iat (0: none, as for chatd's own).
    auth_leeway: int = setting("CHATD_AUTH_LEEWAY", 0, _non_negative)
    # Origins whose pages may show /chat in an iframe (/chat?embed, docs/embedding.md): the
    # page's frame-ancestors. Unset: only chatd's own pages (no clickjacking).
    embed_origins: tuple[str, ...] = setting("CHATD_EMBED_ORIGINS", (), _embed_origins)
    # false: no /register and no password login (users come from the app's tokens).
    local_accounts: bool = setting("CHATD_LOCAL_ACCOUNTS", True, _bool)
    # The before-send hook (chatd/hooks.py): POSTed every message about to be stored;
    # milliseconds it may take; what a timeout or failure means (open: send, closed: refuse).
    before_send_url: str | None = setting("CHATD_BEFORE_SEND_URL", None, _optional)
    before_send_timeout_ms: int = setting("CHATD_BEFORE_SEND_TIMEOUT_MS", 1000)
    before_send_fail_open: bool = setting("CHATD_BEFORE_SEND_FAIL_OPEN", False, _bool)
    # When set, the hook's requests are signed with it (X-Chatd-Signature, chatd/signing.py).
    before_send_secret: str | None = setting("CHATD_BEFORE_SEND_SECRET", None, _optional)
    # Proxies whose X-Forwarded-For names the client (uvicorn's forwarded_allow_ips).
    forwarded_allow_ips: str = setting("CHATD_FORWARDED_ALLOW_IPS", "127.0.0.1,::1", _str)
    # Bots (chatd/handlers/bots.py): their sends have their own bucket, per bot.
    bot_message_rate: Rate | None = setting("CHATD_BOT_MESSAGE_RATE", parse_rate("20/s", 60), _rate)
    # Posts to one incoming webhook (POST /hooks/{id}/{secret}), per webhook.
    hook_rate: Rate | None = setting("CHATD_HOOK_RATE", parse_rate("60/min", 20), _rate)
    # Seconds between two writes of API tokens' last_used_at (per process, one statement).
    token_usage_interval: int = setting("CHATD_TOKEN_USAGE_INTERVAL", 60)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values = {
            f.name: f.metadata["read"](env, f.metadata["env"], f.default)
            for f in dataclasses.fields(cls)
            if "env" in f.metadata
        }
        rate = values["message_rate"]
        if rate is not None and env.get("CHATD_MESSAGE_BURST"):
            burst = _int(env, "CHATD_MESSAGE_BURST", rate.burst)
            values["message_rate"] = Rate(rate.count, rate.period, burst)
        if values["push_gateway_url"] and not values["push_gateway_secret"]:
            raise SystemExit("CHATD_PUSH_GATEWAY_URL needs CHATD_PUSH_GATEWAY_SECRET to sign with")
        secret = env.get("CHATD_SECRET")
        if secret:
            _check_secret(secret, values["dev"])
        _check_identity(values, secret)
        return cls(secret=secret or _stored_secret(values["data_dir"]), **values)


def _from_env(env: Mapping[str, str], name: str) -> Any:
    """One Settings field, read from the environment as from_env reads it."""
    field = next(f for f in dataclasses.fields(Settings) if f.name == name)
    return field.metadata["read"](env, field.metadata["env"], field.default)


def log_options(env: Mapping[str, str]) -> tuple[str, str]:
    """CHATD_LOG_LEVEL and CHATD_LOG_FORMAT, read apart from the rest of Settings so
    logging is set up before reading the rest can warn."""
    return _from_env(env, "log_level"), _from_env(env, "log_format")


def _check_secret(secret: str, dev: bool) -> None:
    """Anyone who knows the signing key can mint tokens for every user: refuse a guessable one."""
    weak = len(secret) < MIN_SECRET_CHARS or secret.strip().lower() in _WEAK_SECRETS
    if weak and not dev:
        raise SystemExit(
            f"CHATD_SECRET is too weak: use at least {MIN_SECRET_CHARS} random characters "
            "(e.g. openssl rand -base64 48), or leave it unset to have one generated; "
            "CHATD_DEV=true accepts it for development"
        )
    if weak:
        log.warning("CHATD_SECRET is weak; accepted because CHATD_DEV is set")


def _check_identity(values: dict[str, Any], secret: str | None) -> None:
    """External tokens need an issuer and an audience to check, and a shared secret as
    strong as CHATD_SECRET and not the same (with it, the app could mint chatd's own)."""
    shared, jwks = values["auth_jwt_secret"], values["auth_jwks_url"]
    if not (shared or jwks):
        return
    missing = [
        v
        for v, f in (("CHATD_AUTH_ISSUER", "auth_issuer"), ("CHATD_AUTH_AUDIENCE", "auth_audience"))
        if not values[f]
    ]
    if missing:
        raise SystemExit(
            f"{' and '.join(missing)} must be set with CHATD_AUTH_JWT_SECRET or "
            "CHATD_AUTH_JWKS_URL: a token is accepted only from that issuer, for that audience"
        )
    if jwks and not jwks.startswith(("https://", "http://")):
        raise SystemExit(f"CHATD_AUTH_JWKS_URL must be an http(s) URL, got {jwks!r}")
    if shared:
        if secret and shared == secret:
            raise SystemExit("CHATD_AUTH_JWT_SECRET must differ from CHATD_SECRET")
        weak = len(shared) < MIN_SECRET_CHARS or shared.strip().lower() in _WEAK_SECRETS
        if weak and not values["dev"]:
            raise SystemExit(
                f"CHATD_AUTH_JWT_SECRET is too weak: use at least {MIN_SECRET_CHARS} random "
                "characters; CHATD_DEV=true accepts it for development"
            )


def _stored_secret(data_dir: Path) -> str:
    """Return the signing secret kept in the data folder, creating it on first use.

    Tokens then survive restarts without the user configuring anything; production
    deployments should set CHATD_SECRET so every instance signs with the same key.
    """
    path = data_dir / "secret"
    secret, created = stored_once(path, lambda: secrets.token_urlsafe(48).encode())
    if created:
        log.warning("CHATD_SECRET is not set: generated one and stored it in %s", path)
    return secret.decode().strip()


def stored_once(path: Path, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """The file's content, writing what `make` returns (mode 0600) if there is no file
    yet; and whether this call wrote it. Processes starting together (`--workers N` on a
    fresh data folder) all get the content of the one that wrote first, never a partial
    file: it is written to a file of its own, then linked into place, which fails if
    taken. (Where the file system has no hard links, it is created in place, exclusively:
    a process starting at that very moment may then read it before it is whole.)"""
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes(), False
    content = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, draft = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        try:
            os.link(draft, path)
        except FileExistsError:
            return path.read_bytes(), False
        except OSError:  # a file system without hard links: create it in place instead
            return _create_in_place(path, content)
        return content, True
    finally:
        os.unlink(draft)


def _create_in_place(path: Path, content: bytes) -> tuple[bytes, bool]:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes(), False
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return content, True
