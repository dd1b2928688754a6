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


class RedactTokens(logging.Filter):
    _token = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self._token.sub(r"\1[redacted]", message), None
        return True
