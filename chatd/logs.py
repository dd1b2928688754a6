"""Logging set-up, the same in the `chatd` process and in every worker process."""

from __future__ import annotations

import logging
import re


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # uvicorn logs request lines with their query string: keep ?token= out of the logs.
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactTokens())
    logging.getLogger("uvicorn.error").addFilter(NoTracebackForClientMistakes())


class RedactTokens(logging.Filter):
    _token = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self._token.sub(r"\1[redacted]", message), None
        return True


class NoTracebackForClientMistakes(logging.Filter):
    """uvicorn logs a traceback for a text frame that is not UTF-8 (and closes it with 1007):
    a client's mistake, which any client could repeat to flood the log. One line is enough."""

    _messages = ("Invalid UTF-8 sequence received from client",)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith(self._messages):
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True
