"""Settings, read once from the environment (every variable is documented in README.md)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from chatd.ratelimit import Rate, parse_rate

log = logging.getLogger("chatd")

DEFAULT_DATA_DIR = ".chatd"
MIN_SECRET_CHARS = 32
_WEAK_SECRETS = {"secret", "changeme", "change-me", "password", "chatd", "development", "test"}

# Default limits (README.md explains each; "off" switches one off).
LOGIN_EMAIL_RATE = parse_rate("10/15min")  # failed logins per email
LOGIN_IP_RATE = parse_rate("100/15min")  # failed logins per client address
REGISTER_RATE = parse_rate("20/h")  # registrations per client address
MESSAGE_RATE = parse_rate("10/s", burst=30)  # sends per user
TYPING_RATE = parse_rate("10/10s")  # typing frames per user that pass the per-chat gate
MAX_SOCKETS_PER_USER = 20
CREATE_CHAT_RATE = parse_rate("60/h")  # chats created per user (private and group)
ADD_MEMBERS_RATE = parse_rate("1000/day")  # users put into chats per user, not calls
GROUPS_PER_DAY = 100  # groups a user creates in any 24 h (counted in the database)


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    secret: str
    dev: bool = False  # development mode: tolerates a weak CHATD_SECRET
    redis_url: str | None = None
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    access_token_ttl: int = 15 * 60
    refresh_token_ttl: int = 7 * 24 * 3600
    max_frame_bytes: int = 64 * 1024
    # Off by default: per-socket compression state costs ~35 KiB and CPU on every frame.
    ws_deflate: bool = False
    # Browser origins allowed to open /connect besides the server's own ("*": any).
    allowed_origins: tuple[str, ...] = ()
    send_queue_size: int = 1024
    # Seconds a socket may go without accepting a frame before it is closed (1013).
    write_timeout: int = 10
    # Bytes the transport may hold for one socket's peer, pongs included (1008 past it).
    socket_buffer_bytes: int = 4 * 1024 * 1024
    # Seconds a connection has to send a request's headers; seconds an idle keep-alive
    # HTTP connection stays open.
    header_timeout: int = 10
    keepalive_timeout: int = 5
    db_pool_size: int = 20
    # Seconds a database connect or statement may take before it fails as `unavailable`.
    db_timeout: int = 10
    log_level: str = "info"
    log_format: str = "json"  # or "console"; see chatd/logs.py
    # SIGTERM: seconds to finish the sends in flight and close every socket before exiting.
    shutdown_grace: int = 10
    # Rate limits (None: off). Failed logins count per email and per client address.
    login_email_rate: Rate | None = LOGIN_EMAIL_RATE
    login_ip_rate: Rate | None = LOGIN_IP_RATE
    register_rate: Rate | None = REGISTER_RATE  # per client address
    message_rate: Rate | None = MESSAGE_RATE  # per user
    typing_rate: Rate | None = TYPING_RATE  # per user, on top of TypingGate
    max_sockets_per_user: int | None = MAX_SOCKETS_PER_USER  # oldest closed
    create_chat_rate: Rate | None = CREATE_CHAT_RATE  # per user
    add_members_rate: Rate | None = ADD_MEMBERS_RATE  # per user, counting users added
    groups_per_day: int | None = GROUPS_PER_DAY  # per user
    # Proxies whose X-Forwarded-For names the client (uvicorn's forwarded_allow_ips).
    forwarded_allow_ips: str = "127.0.0.1,::1"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("CHATD_DATA_DIR", DEFAULT_DATA_DIR))
        dev = _bool(env, "CHATD_DEV")
        secret = env.get("CHATD_SECRET")
        if secret:
            _check_secret(secret, dev)
        log_level, log_format = log_options(env)
        return cls(
            database_url=env.get("CHATD_DATABASE_URL") or None,
            secret=secret or _stored_secret(data_dir),
            dev=dev,
            redis_url=env.get("CHATD_REDIS_URL") or None,
            workers=_int(env, "CHATD_WORKERS", 1),
            host=env.get("CHATD_HOST", "127.0.0.1"),
            port=_int(env, "CHATD_PORT", 8000),
            data_dir=data_dir,
            access_token_ttl=_int(env, "CHATD_ACCESS_TOKEN_TTL", 15 * 60),
            refresh_token_ttl=_int(env, "CHATD_REFRESH_TOKEN_TTL", 7 * 24 * 3600),
            send_queue_size=_int(env, "CHATD_SEND_QUEUE_SIZE", 1024),
            write_timeout=_int(env, "CHATD_WRITE_TIMEOUT", 10),
            socket_buffer_bytes=_int(env, "CHATD_SOCKET_BUFFER_BYTES", 4 * 1024 * 1024),
            header_timeout=_int(env, "CHATD_HEADER_TIMEOUT", 10),
            keepalive_timeout=_int(env, "CHATD_KEEPALIVE_TIMEOUT", 5),
            ws_deflate=_bool(env, "CHATD_WS_DEFLATE"),
            allowed_origins=tuple(
                o.strip().rstrip("/")
                for o in env.get("CHATD_ALLOWED_ORIGINS", "").split(",")
                if o.strip()
            ),
            db_pool_size=_int(env, "CHATD_DB_POOL_SIZE", 20),
            db_timeout=_int(env, "CHATD_DB_TIMEOUT", 10),
            log_level=log_level,
            log_format=log_format,
            shutdown_grace=_int(env, "CHATD_SHUTDOWN_GRACE", 10),
            login_email_rate=_rate(env, "CHATD_LOGIN_EMAIL_RATE", LOGIN_EMAIL_RATE),
            login_ip_rate=_rate(env, "CHATD_LOGIN_IP_RATE", LOGIN_IP_RATE),
            register_rate=_rate(env, "CHATD_REGISTER_RATE", REGISTER_RATE),
            message_rate=_rate(env, "CHATD_MESSAGE_RATE", MESSAGE_RATE, "CHATD_MESSAGE_BURST"),
            typing_rate=_rate(env, "CHATD_TYPING_RATE", TYPING_RATE),
            max_sockets_per_user=_cap(env, "CHATD_MAX_SOCKETS_PER_USER", MAX_SOCKETS_PER_USER),
            create_chat_rate=_rate(env, "CHATD_CREATE_CHAT_RATE", CREATE_CHAT_RATE),
            add_members_rate=_rate(env, "CHATD_ADD_MEMBERS_RATE", ADD_MEMBERS_RATE),
            groups_per_day=_cap(env, "CHATD_GROUPS_PER_DAY", GROUPS_PER_DAY),
            forwarded_allow_ips=env.get("CHATD_FORWARDED_ALLOW_IPS", "127.0.0.1,::1").strip(),
        )


def log_options(env: Mapping[str, str]) -> tuple[str, str]:
    """CHATD_LOG_LEVEL and CHATD_LOG_FORMAT: JSON lines by default, console lines in dev mode.

    Read apart from Settings so logging is set up before reading the rest can warn.
    """
    level = env.get("CHATD_LOG_LEVEL", "info").lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise SystemExit(f"CHATD_LOG_LEVEL must be debug, info, warning or error, got {level!r}")
    default_format = "console" if _bool(env, "CHATD_DEV") else "json"
    log_format = env.get("CHATD_LOG_FORMAT", "").lower() or default_format
    if log_format not in ("json", "console"):
        raise SystemExit(f"CHATD_LOG_FORMAT must be json or console, got {log_format!r}")
    return level, log_format


def _int(env: dict[str, str], name: str, default: int) -> int:
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


def _rate(
    env: dict[str, str], name: str, default: Rate | None, burst_name: str | None = None
) -> Rate | None:
    """`name` as a rate ("10/min", "off"); `burst_name`, when given, sets its burst."""
    raw = env.get(name, "").strip()
    try:
        rate = parse_rate(raw) if raw else default
    except ValueError as exc:
        raise SystemExit(f"{name}: {exc}") from None
    if rate is not None and burst_name and env.get(burst_name):
        rate = Rate(rate.count, rate.period, _int(env, burst_name, rate.burst))
    return rate


def _cap(env: dict[str, str], name: str, default: int | None) -> int | None:
    """A positive integer, or 0 / off for no cap."""
    raw = env.get(name, "").strip().lower()
    if raw in ("0", "off", "none", "unlimited"):
        return None
    return _int(env, name, default)


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


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"{name} must be true or false, got {raw!r}")


def _stored_secret(data_dir: Path) -> str:
    """Return the signing secret kept in the data folder, creating it on first use.

    Tokens then survive restarts without the user configuring anything; production
    deployments should set CHATD_SECRET so every instance signs with the same key.
    """
    path = data_dir / "secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    log.warning("CHATD_SECRET is not set: generated one and stored it in %s", path)
    return secret
