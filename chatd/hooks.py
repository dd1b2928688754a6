"""The before-send hook: the app's server sees every message before it is stored.

With CHATD_BEFORE_SEND_URL set, each send and forward (handlers/messages.py
`store_message`) is POSTed there, synchronously, before it enters the writer's batch:

    {"type": "before_send", "id": "<uuid>", "chat_id": 7, "chat_type": "group",
     "sender_uuid": "...", "text": "...", "client_msg_id": "..." | null,
     "reply_to": 12 | null, "mentions": [...], "attachments": ["<file id>", ...],
     "forwarded": false}

and the answer (2xx, JSON) decides:

    {"action": "allow"}                       (an empty 2xx body, or 204, too)
    {"action": "reject", "reason": "..."}     the sender gets `rejected` with the reason
    {"action": "rewrite", "text": "..."}      stored with this text instead

Anything else (no answer within CHATD_BEFORE_SEND_TIMEOUT_MS, a non-2xx status, an answer
that is not one of those, a rewrite to a text no send could have) is a failure, and
CHATD_BEFORE_SEND_FAIL_OPEN decides: true sends the message as it is, false (the default)
refuses it with `unavailable` (retry with the same client_msg_id). Each call's latency is
chatd_before_send_seconds{outcome}.

The URL is the operator's, not a user's: no SSRF check (chatd/deliveries.py url_problem)
is made, and it may point at a private address. With CHATD_BEFORE_SEND_SECRET the request
is signed like webhooks (chatd/signing.py), so the receiver knows chatd sent it.

Unset, none of this exists: node.before_send is None and a send pays one `is None`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import httpx
import msgspec

from chatd import metrics, signing
from chatd.config import Settings

log = logging.getLogger("chatd.hooks")

MAX_ANSWER_BYTES = 64 * 1024
MAX_REASON_CHARS = 500


@dataclass(frozen=True, slots=True)
class Verdict:
    """The hook's answer: allow (text None), rewrite (text), or reject (reason);
    failed: no usable answer (the policy decides)."""

    action: str  # "allow", "rewrite", "reject" or "failed"
    text: str | None = None
    reason: str | None = None


class _Answer(msgspec.Struct, forbid_unknown_fields=False):
    action: str = "allow"
    text: str | None = None
    reason: str | None = None


class BeforeSend:
    """node.before_send: one HTTP client, kept alive, for the hook's calls."""

    def __init__(self, settings: Settings) -> None:
        assert settings.before_send_url
        self.url = settings.before_send_url
        self.timeout = settings.before_send_timeout_ms / 1000
        self.fail_open = settings.before_send_fail_open
        self.secret = (settings.before_send_secret or "").encode() or None
        self.http = httpx.AsyncClient(
            timeout=self.timeout,
            follow_redirects=False,
            headers={"User-Agent": "chatd", "Content-Type": "application/json"},
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def check(self, message: dict[str, object]) -> Verdict:
        """Ask the hook about `message`; a failed Verdict when it did not answer usably
        within the timeout (never raises but for cancellation)."""
        call_id = str(uuid.uuid4())
        body = msgspec.json.encode({"type": "before_send", "id": call_id, **message})
        headers = signing.signature_headers(self.secret, body, call_id) if self.secret else {}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):  # all of it, not per phase
                verdict = await self._call(body, headers)
        except TimeoutError:
            verdict, outcome = Verdict("failed", reason="timeout"), "timeout"
        except (httpx.HTTPError, OSError) as exc:
            verdict, outcome = Verdict("failed", reason=repr(exc)), "error"
        else:
            outcome = verdict.action if verdict.action != "failed" else "error"
        metrics.BEFORE_SEND_SECONDS.labels(outcome).observe(time.perf_counter() - started)
        if verdict.action == "failed":
            log.warning("before-send hook failed (%s): %s", outcome, verdict.reason)
        return verdict

    async def _call(self, body: bytes, headers: dict[str, str]) -> Verdict:
        async with self.http.stream("POST", self.url, content=body, headers=headers) as response:
            answer = bytearray()
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) > MAX_ANSWER_BYTES:
                    return Verdict("failed", reason="answer too large")
        if not 200 <= response.status_code < 300:
            return Verdict("failed", reason=f"status {response.status_code}")
        if response.status_code == 204 or not answer.strip():
            return Verdict("allow")
        try:
            parsed = msgspec.json.decode(answer, type=_Answer)
        except msgspec.DecodeError as exc:
            return Verdict("failed", reason=f"not an answer: {exc}")
        if parsed.action == "allow":
            return Verdict("allow")
        if parsed.action == "reject":
            reason = (parsed.reason or "").strip()[:MAX_REASON_CHARS]
            return Verdict("reject", reason=reason or "the message was rejected")
        if parsed.action == "rewrite" and parsed.text is not None:
            return Verdict("rewrite", text=parsed.text)
        return Verdict("failed", reason=f"unknown action {parsed.action[:40]!r}")
