"""Logging set-up, the same in the `chatd` process and in every worker process.

Two formats: `json` (the default: one JSON object per line, for log collectors) and
`console` (readable lines for development). Either way every record carries the ids of
the connection or HTTP request it happened in, taken from context variables that the
socket session and the request middleware set, so one grep follows a client.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import secrets
import sys
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatd.db import is_unavailable

# The ids of whatever the current task is serving; asyncio copies them into child tasks.
conn_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("conn_id", default=None)
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
user_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("user_id", default=None)
_CONTEXT = (("conn_id", conn_id), ("request_id", request_id), ("user_id", user_id))


def setup_logging(level: str, log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    handler.addFilter(AddContext())
    # On the handler, not a logger: records propagated from any logger pass through it.
    handler.addFilter(RedactTokens())
    logging.getLogger("asyncpg.pool").addFilter(OneLineWhenUnavailable())
    logging.getLogger("uvicorn.error").addFilter(NoTracebackForClientMistakes())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def new_id() -> str:
    return secrets.token_hex(6)


class AddContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            # (client, method, path, http version, status): the two worth filtering on.
            if len(record.args) == 5:
                record.method, record.status = record.args[1], record.args[4]
        return True


class RedactTokens(logging.Filter):
    """Keep credentials out of the logs: `?token=` in uvicorn's request lines, the
    Authorization and Cookie headers the websockets library logs at debug level,
    anything shaped like a JWT or an API token, and incoming webhooks' secrets."""

    _secrets = re.compile(
        r"(token=)[^&\s\"']+|((?:authorization|cookie):\s*).+|(Bearer\s+)\S+"
        r"|()eyJ[\w-]+\.[\w-]+\.[\w-]+"  # a JWT anywhere, however its key was spelled
        r"|(/hooks/\d+/)[^\s\"'?]+"  # an incoming webhook's secret, in its URL
        r"|()chatd_(?:bot|pat)_[\w-]+",  # an API token anywhere
        re.IGNORECASE,
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._secrets.search(message):
            record.msg, record.args = self._secrets.sub(_redacted, message), None
        return True


def _redacted(match: re.Match[str]) -> str:
    prefix = next(group for group in match.groups() if group is not None)
    return prefix + "[redacted]"


# Attributes every LogRecord has; anything else came from `extra=` and is logged as a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
_STANDARD |= {name for name, _ in _CONTEXT}


class JsonFormatter(logging.Formatter):
    # enc_hook=str: a UUID, Path or exception passed in `extra=` is logged as its text.
    _encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, _ in _CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        try:
            return self._encoder.encode(line).decode()
        except UnicodeEncodeError:  # a lone surrogate from hostile input: escape it
            return json.dumps(line, default=str)


class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(
            f"{name}={value}"
            for name, _ in _CONTEXT
            if (value := getattr(record, name, None)) is not None
        )
        if not ids:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} [{ids}]{newline}{rest}"


class RequestIdMiddleware:
    """Give every HTTP request an id: the caller's X-Request-ID when sane, else a new one.

    The id is echoed in the response's X-Request-ID header and carried by every log line
    written while serving the request, uvicorn's access line included.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _caller_request_id(scope) or new_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        # Not reset afterwards: each request runs in a task of its own, and the 500 line
        # uvicorn logs after an uncaught exception should carry the id too.
        request_id.set(rid)
        await self.app(scope, receive, send_with_id)


_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def _caller_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id" and _SANE_ID.fullmatch(value):
            return value.decode()
    return None


class OneLineWhenUnavailable(logging.Filter):
    """asyncpg's pool logs a traceback each time it fails to reconnect while the database
    is down; the exception's one-line summary says all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_unavailable(exc):
            record.msg, record.args = f"{record.getMessage()}: {exc!r}", None
            record.exc_info = None
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
