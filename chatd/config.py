"""Settings, read once from the environment (every variable is documented in README.md)."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("chatd")

DEFAULT_DATA_DIR = ".chatd"
MIN_SECRET_CHARS = 32
_WEAK_SECRETS = {"secret", "changeme", "change-me", "password", "chatd", "development", "test"}


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
    db_pool_size: int = 20
    # Seconds a database connect or statement may take before it fails as `unavailable`.
    db_timeout: int = 10
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("CHATD_DATA_DIR", DEFAULT_DATA_DIR))
        dev = _bool(env, "CHATD_DEV")
        secret = env.get("CHATD_SECRET")
        if secret:
            _check_secret(secret, dev)
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
            ws_deflate=_bool(env, "CHATD_WS_DEFLATE"),
            allowed_origins=tuple(
                o.strip().rstrip("/")
                for o in env.get("CHATD_ALLOWED_ORIGINS", "").split(",")
                if o.strip()
            ),
            db_pool_size=_int(env, "CHATD_DB_POOL_SIZE", 20),
            db_timeout=_int(env, "CHATD_DB_TIMEOUT", 10),
            log_level=env.get("CHATD_LOG_LEVEL", "info").lower(),
        )


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


def _bool(env: dict[str, str], name: str) -> bool:
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
