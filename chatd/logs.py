"""Logging set-up, the same in the `chatd` process and in every worker process."""

from __future__ import annotations

import logging
import re

from chatd.db import is_unavailable


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # uvicorn logs request lines with their query string: keep ?token= out of the logs.
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactTokens())
    logging.getLogger("asyncpg.pool").addFilter(OneLineWhenUnavailable())


class RedactTokens(logging.Filter):
    _token = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self._token.sub(r"\1[redacted]", message), None
        return True


class OneLineWhenUnavailable(logging.Filter):
    """asyncpg's pool logs a traceback each time it fails to reconnect while the database
    is down; the exception's one-line summary says all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_unavailable(exc):
            record.msg, record.args = f"{record.getMessage()}: {exc!r}", None
            record.exc_info = None
        return True
