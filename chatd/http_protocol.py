"""uvicorn's httptools protocol, with bounded request heads and a header timeout.

uvicorn reads a request head for as long as the client cares to send it: it has no header
timeout, and httptools sets no limit on the URL or the headers. A client could hold a
connection open for good by sending nothing, or a header byte every few seconds
(slowloris), and could grow the server's memory with an endless URL or header. Here:

- The head of each request (request line and headers) must be complete within
  `header_timeout` seconds (CHATD_HEADER_TIMEOUT) of the connection opening, or of the
  request's first byte on a keep-alive connection. Past it, a client that has sent part of
  a head gets 408; a connection that has sent nothing is just closed.
- A URL of MAX_URL_BYTES or more gets 414 and a closed connection, WebSocket upgrades
  included (uvicorn hands an upgrade's head to the WebSocket protocol, which refused long
  request lines without ever writing its 414).
- A head over MAX_HEAD_BYTES gets 431 and a closed connection. It is counted by the chunk
  read: memory for one head stays within MAX_HEAD_BYTES plus one read.
- An idle keep-alive connection is closed after uvicorn's `timeout_keep_alive`
  (CHATD_KEEPALIVE_TIMEOUT): that timer is uvicorn's own.

chatd passes its settings to the protocols on uvicorn's Config (`attach_settings`): the
Config is what uvicorn hands every protocol it makes, and what it sends to each worker
process with `--workers N`.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from chatd.config import Settings
from chatd.protocol import BAD_REQUEST, INVALID, ErrorBody, ErrorResponse, encode

MAX_URL_BYTES = 8 * 1024  # a URL this long or longer gets 414
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together; past it, 431
LINGER_SECONDS = 2.0  # after a refusal, how long what the client still sends is dropped

# A refusal's body is chatd's usual error object, as a REST client parses every other error.
_REFUSALS = {
    HTTPStatus.REQUEST_URI_TOO_LONG: (INVALID, f"the URL must be under {MAX_URL_BYTES} bytes"),
    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE: (
        INVALID,
        f"the request line and headers must be at most {MAX_HEAD_BYTES} bytes",
    ),
    HTTPStatus.REQUEST_TIMEOUT: (BAD_REQUEST, "the request head did not arrive in time"),
}


_SETTINGS = "chatd_settings"


def attach_settings(config: Config, settings: Settings) -> None:
    """Give every protocol uvicorn makes from `config` chatd's limits (workers included):
    CHATD_HEADER_TIMEOUT, CHATD_SOCKET_BUFFER_BYTES and CHATD_WRITE_TIMEOUT."""
    setattr(config, _SETTINGS, settings)


def settings_of(config: Config) -> Settings:
    """The settings attached to `config`, or the defaults for a Config chatd did not build
    (the protocols read only their limits: no secret is needed)."""
    return getattr(config, _SETTINGS, None) or Settings(secret="")


def peer(client: tuple[str, int] | None) -> str:
    """A connection's client address, for the log."""
    return f"{client[0]}:{client[1]}" if client else "-"


class _Refused(Exception):
    """Raised from a parser callback to stop parsing: the head is refused (self.refusal)."""


class HttpProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timeout = settings_of(config).header_timeout
        self.header_timer: asyncio.TimerHandle | None = None
        self.refusal: HTTPStatus | None = None  # answered with this, and closing
        self.url = b""  # uvicorn sets it when a request begins
        # head_begun: part of a request head has come, not all; head_bytes: how much,
        # counted by chunk (see data_received).
        self.head_begun = False
        self.head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn 0.54's data_received, but a refused head gets its own answer (not
        # uvicorn's 400 and its "Invalid HTTP request" warning), and what follows is dropped.
        if self.refusal is not None:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.refusal is not None:
                self._refuse(self.refusal)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self.head_begun:
            # A head still not complete after this chunk: count all of the chunk (exact
            # when the head was under way before it; else the chunk also held the end of
            # the request before, and the count errs on the safe side).
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)

    # --- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_begun = True
        self.head_bytes = 0
        self._start_header_timer()  # a keep-alive connection's next request

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) >= MAX_URL_BYTES:
            self.refusal = HTTPStatus.REQUEST_URI_TOO_LONG
            raise _Refused  # feed_data stops and raises HttpParserCallbackError

    def on_headers_complete(self) -> None:
        self.head_begun = False
        self._stop_header_timer()
        super().on_headers_complete()

    # --- header timeout ----------------------------------------------------------------

    def _start_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is late while a response is still going out: let that
            # response finish, then close (the head is bounded by MAX_HEAD_BYTES meanwhile).
            self.cycle.keep_alive = False
            return
        self.logger.info(
            "%s - request head not complete in %gs", peer(self.client), self.header_timeout
        )
        if self.head_begun:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT)
        else:
            self._close()

    # --- refusing ------------------------------------------------------------------------

    def _refuse(self, status: HTTPStatus) -> None:
        """Answer `status` with `Connection: close` and close the connection."""
        self.refusal = status
        self._stop_header_timer()
        self.logger.info("%s - %d %s", peer(self.client), status.value, status.phrase)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head, refused while a response is going out: no answer in the
            # middle of that one; the connection closes once it is sent.
            self.pipeline.clear()
            self.cycle.keep_alive = False
            return
        code, message = _REFUSALS[status]
        body = encode(ErrorResponse(ErrorBody(code, message))) + b"\n"
        head = [f"HTTP/1.1 {status.value} {status.phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._close(answered=True)

    def _close(self, answered: bool = False) -> None:
        self.pipeline.clear()
        if self.transport.get_write_buffer_size():
            # The client is not reading even this answer: do not wait on it to drain.
            self.transport.abort()
        elif answered and self.transport.can_write_eof():
            # A lingering close: the answer, then our FIN, and what the client still sends
            # is read and dropped for a moment. Closing at once with its bytes unread would
            # reset the connection, and the reset can destroy the answer before it is read.
            self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
