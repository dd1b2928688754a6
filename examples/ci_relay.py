"""Post a CI result into a chat through an incoming webhook: no token, no socket.

    .venv/bin/python examples/ci_relay.py --hook "$CHATD_HOOK_URL" --status passed \
        --name "build #42" --link https://ci.example.com/42

The hook URL comes from POST /chats/{id}/webhooks (the server's address, then the `url`
it answers; keep it secret, it is the credential). Only the standard library is used, so a
CI job can run it as is. Exit status 0 once the message is posted (a retry with the same
--id posts nothing twice).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

ICONS = {"passed": "✅", "failed": "❌", "cancelled": "⚪"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hook", default=os.environ.get("CHATD_HOOK_URL"), help="webhook URL")
    parser.add_argument("--status", required=True, choices=sorted(ICONS))
    parser.add_argument("--name", required=True, help="what ran: 'build #42'")
    parser.add_argument("--link", help="where to read more")
    parser.add_argument("--id", help="Idempotency-Key: the same id posts once")
    args = parser.parse_args()
    if not args.hook:
        parser.error("give --hook (or CHATD_HOOK_URL)")
    text = f"{ICONS[args.status]} {args.name} {args.status}"
    if args.link:
        text += f": {args.link}"
    headers = {"Content-Type": "application/json"}
    if args.id:
        headers["Idempotency-Key"] = args.id
    request = urllib.request.Request(
        args.hook, json.dumps({"text": text}).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            posted = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"chatd refused the post: {exc.code} {exc.read().decode()}", file=sys.stderr)
        return 1
    print(f"posted message {posted['id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
