"""The `chatd` command: `chatd serve`, `chatd migrate` and `chatd bench`."""

from __future__ import annotations

import argparse
import logging
import re
import signal

from chatd.config import Settings

log = logging.getLogger("chatd")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatd", description="A WebSocket-first chat server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate the database, then serve HTTP and /connect")
    serve.add_argument("--host", help="interface to listen on (default $CHATD_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default $CHATD_PORT or 8000)")
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    commands.add_parser(
        "bench", help="load-test a running chatd (chatd bench --help)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # a client of chatd: no database, no settings
        from chatd.bench import main as bench_main

        raise SystemExit(bench_main(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    database_url = resolve_database_url(settings)
    from chatd.db import migrate

    migrate(database_url)
    if args.command == "serve":
        run_server(settings, database_url, args.host or settings.host, args.port or settings.port)


def resolve_database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    from chatd.embedded import start_embedded_postgres

    return start_embedded_postgres(settings.data_dir)


def run_server(settings: Settings, database_url: str, host: str, port: int) -> None:
    import uvicorn

    from chatd.app import create_app

    log.info("chatd listening on http://%s:%d (WebSocket: /connect)", host, port)
    config = uvicorn.Config(
        create_app(settings, database_url),
        host=host,
        port=port,
        ws="websockets-sansio",
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=False,
        log_level=settings.log_level,
        lifespan="on",
    )
    # uvicorn logs request lines with their query string: keep ?token= out of the logs.
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactTokens())
    # uvicorn shuts down on SIGTERM, then re-raises it with the handler it found. With the
    # default handler the process would die there, skipping the exit hooks that stop the
    # embedded PostgreSQL; this handler turns the re-raise into a normal exit instead.
    signal.signal(signal.SIGTERM, _exit_normally)
    uvicorn.Server(config).run()


def _exit_normally(signum: int, frame: object) -> None:
    raise SystemExit(0)


class RedactTokens(logging.Filter):
    _token = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self._token.sub(r"\1[redacted]", message), None
        return True
