"""Signatures on what chatd POSTs to other servers (webhooks, the push gateway).

Standard library only: the bot SDK verifies with it without the server's dependencies.

Each request carries three headers:

    X-Chatd-Delivery:  the delivery's id; a retry carries the same one (deduplicate by it)
    X-Chatd-Timestamp: when this attempt was signed, in Unix seconds
    X-Chatd-Signature: v1=<hex HMAC-SHA256 over "<timestamp>." followed by the body>

The receiver recomputes the HMAC with its secret, compares in constant time, and refuses a
timestamp too far from its clock (a captured request cannot be replayed later).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

DELIVERY = "X-Chatd-Delivery"
TIMESTAMP = "X-Chatd-Timestamp"
SIGNATURE = "X-Chatd-Signature"
VERSION = "v1"
# Seconds a signed request stays acceptable, either side of the receiver's clock.
DEFAULT_TOLERANCE = 300


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256)
    return f"{VERSION}={mac.hexdigest()}"


def signature_headers(
    secret: bytes, body: bytes, delivery_id: int | str, timestamp: int | None = None
) -> dict[str, str]:
    """The three headers of one signed request."""
    now = int(time.time()) if timestamp is None else timestamp
    return {
        DELIVERY: str(delivery_id),
        TIMESTAMP: str(now),
        SIGNATURE: sign(secret, body, now),
    }


def verify(
    secret: bytes,
    body: bytes,
    headers: Mapping[str, str],
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether `headers` sign `body` with `secret`, within `tolerance` seconds of now.

    `headers` is looked up case-insensitively when it is a plain dict of any case
    (Starlette's and httpx's Headers already are).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_timestamp = lowered.get(TIMESTAMP.lower(), "")
    signature = lowered.get(SIGNATURE.lower(), "")
    if not raw_timestamp.isdigit() or len(raw_timestamp) > 12:
        return False
    timestamp = int(raw_timestamp)
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), signature)
