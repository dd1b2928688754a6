"""The `chatd` command: serve, migrate, backup, restore and bench."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from chatd.config import Settings, log_options
from chatd.logs import setup_logging

log = logging.getLogger("chatd")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatd", description="A WebSocket-first chat server.")
    parser.add_argument("--version", action="version", version=f"chatd {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate the database, then serve HTTP and /connect")
    serve.add_argument("--host", help="interface to listen on (default $CHATD_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default $CHATD_PORT or 8000)")
    serve.add_argument(
        "--workers", type=int, help="processes to serve with (default $CHATD_WORKERS or 1)"
    )
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    backup = commands.add_parser("backup", help="write the database and the files to FILE (a tar)")
    backup.add_argument("file", type=Path)
    restore = commands.add_parser("restore", help="load FILE into an empty database")
    restore.add_argument("file", type=Path)
    commands.add_parser(
        "bench", help="load-test a running chatd (chatd bench --help)", add_help=False
    )
    add_admin_commands(commands)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # a client of chatd: no database, no settings
        from chatd.bench import main as bench_main

        raise SystemExit(bench_main(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    # SIGTERM and SIGINT end chatd as a normal exit, so the exit hooks run (they stop the
    # embedded PostgreSQL). While serving, uvicorn handles both first, drains, then
    # re-raises the signal with the handler it found: this one, so the exit is normal.
    # Other commands stopped by a signal exit with 128 + its number, as a shell reports it,
    # so `chatd backup f && upload f` does not upload a cut-off dump.
    on_signal = _exit_normally if args.command == "serve" else _exit_interrupted
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    setup_logging(*log_options(os.environ))
    settings = Settings.from_env()
    workers = (args.workers if args.command == "serve" else None) or settings.workers
    if workers > 1 and not settings.redis_url:
        parser.error("--workers above 1 needs CHATD_REDIS_URL: events cross processes via Redis")
    with _signals_deferred():
        database_url = resolve_database_url(settings)
    if args.command in ("backup", "restore"):
        from chatd import backup

        run = backup.backup if args.command == "backup" else backup.restore
        run(database_url, args.file, settings)
        log.info("%s: done (%s)", args.command, args.file)
        return
    from chatd.db import migrate

    migrate(database_url)
    if args.command == "admin":
        from chatd.admin_cli import run_admin

        raise SystemExit(run_admin(args, settings, database_url))
    if args.command == "serve":
        host, port = args.host or settings.host, args.port or settings.port
        run_server(settings, database_url, host, port, workers)


def add_admin_commands(commands: Any) -> None:
    """`chatd admin <subcommand>`: the /admin API's operations, straight on the database."""
    admin = commands.add_parser("admin", help="manage accounts (chatd admin --help)")
    sub = admin.add_subparsers(dest="admin_command", required=True)
    create = sub.add_parser("create-user", help="create an account")
    create.add_argument("email")
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="with the admin role")
    set_password = sub.add_parser(
        "set-password", help="set an account's password (signs out its sessions)"
    )
    set_password.add_argument("user", help="email or user uuid")
    for name, text in (
        ("disable", "disable an account: its sessions end, its logins are refused"),
        ("enable", "enable a disabled account"),
        ("delete", "delete an account, as DELETE /me does"),
        ("promote", "give an account the admin role"),
        ("demote", "take the admin role away"),
    ):
        sub.add_parser(name, help=text).add_argument("user", help="email or user uuid")
    listing = sub.add_parser("list", help="list accounts (JSON lines)")
    listing.add_argument("--q", help="name or email prefix")
    sub.add_parser("stats", help="counts (JSON)")
    for parser in (create, set_password):
        parser.add_argument(
            "--password-stdin", action="store_true", help="read the password from stdin"
        )


def version() -> str:
    """chatd's version, as installed (pyproject.toml's)."""
    try:
        return metadata.version("chatd")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def resolve_database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    from chatd.embedded import start_embedded_postgres

    return start_embedded_postgres(settings.data_dir)


def run_server(
    settings: Settings, database_url: str, host: str, port: int, workers: int = 1
) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from chatd.app import create_app
    from chatd.http_protocol import HttpProtocol, attach_settings
    from chatd.websocket_protocol import WebSocketProtocol

    log.info(
        "chatd listening on http://%s:%d (WebSocket: /connect), %d process(es)%s",
        host,
        port,
        workers,
        ", events through Redis" if settings.redis_url else "",
    )
    options = dict(
        host=host,
        port=port,
        # uvicorn's "httptools" + bounded request heads and a header timeout
        http=HttpProtocol,
        ws=WebSocketProtocol,  # uvicorn's "websockets-sansio" + shutdown and stall handling
        # chatd closes frames over max_frame_bytes itself, with a clean 1009 handshake
        # (session.py). uvicorn's own refusal closes the TCP connection at once, and the
        # client's unsent bytes turn that into a reset that loses the 1009: keep it for
        # frames far over the limit only.
        ws_max_size=settings.max_frame_bytes * 4,
        ws_per_message_deflate=settings.ws_deflate,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's records go through chatd's handler (JSON or console)
        lifespan="on",
        # On SIGTERM: stop listening, let sockets finish (chatd/websocket_protocol.py), and cancel
        # whatever is still open after this many seconds.
        timeout_graceful_shutdown=settings.shutdown_grace,
        timeout_keep_alive=settings.keepalive_timeout,  # idle keep-alive HTTP connections
        # The client address (per-address rate limits) comes from X-Forwarded-For only
        # when the connection is from one of these proxies.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    if workers == 1:
        config = uvicorn.Config(create_app(settings, database_url), **options)
        attach_settings(config, settings)
        uvicorn.Server(config).run()
        return
    # Worker processes build their own app from the environment: hand them the database.
    os.environ["CHATD_DATABASE_URL"] = database_url
    os.environ["CHATD_SECRET"] = settings.secret
    # /metrics sums every worker's figures (chatd/metrics.py): they write them here.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="chatd-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # What uvicorn.run does for workers, with the limits on the Config each worker gets.
    config = uvicorn.Config(
        "chatd.app:create_app_from_env", factory=True, workers=workers, **options
    )
    attach_settings(config, settings)
    Multiprocess(config, sockets=[config.bind_socket()]).run()


def _exit_normally(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _exit_interrupted(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block is done, then exit if one came.

    Starting the embedded PostgreSQL must not be cut halfway: interrupted there, the
    cluster could be left running without this process listed as its user (so nothing
    would stop it), or half initialised.
    """
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: received.append(signum))
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        log.info("%s during start: exiting", signal.Signals(received[0]).name)
        handler = previous[received[0]]
        if callable(handler):
            handler(received[0], None)
        raise SystemExit(128 + received[0])
