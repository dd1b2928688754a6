"""Print one chat live: its recent history, then every new message as it arrives.

    .venv/bin/python examples/tail.py --chat 7 --email alice@example.com --password wonderland

Email and password may also come from CHATD_EMAIL and CHATD_PASSWORD; the server from
--url or CHATD_URL (default http://127.0.0.1:8000). Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from typing import Any

from chatd.client import Client


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat", type=int, required=True, help="chat id")
    parser.add_argument("--last", type=int, default=10, help="history lines to show first")
    parser.add_argument("--url", default=os.environ.get("CHATD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--email", default=os.environ.get("CHATD_EMAIL"))
    parser.add_argument("--password", default=os.environ.get("CHATD_PASSWORD"))
    args = parser.parse_args()
    if not args.email or not args.password:
        parser.error("give --email and --password (or CHATD_EMAIL and CHATD_PASSWORD)")
    return args


def show(message: dict[str, Any], names: dict[str, str]) -> None:
    who = names.get(message["sender_uuid"], message["sender_uuid"][:8])
    print(f"{message['timestamp'][:19]} #{message['seq']} {who}: {message['text']}", flush=True)


async def main(args: argparse.Namespace) -> None:
    async with Client(args.url, email=args.email, password=args.password) as c:
        chat = await c.rest("GET", f"/chats/{args.chat}")
        names = {m["user_uuid"]: m["name"] for m in chat["members"]}
        print(f"-- {chat['name'] or 'private chat'} ({args.chat})", flush=True)
        shown = 0
        if args.last > 0:
            recent = await c.history(args.chat, page=1, page_size=min(args.last, 200))
            for message in recent["messages"]:
                show(message, names)
            shown = recent["messages"][-1]["seq"] if recent["messages"] else 0
        async for event in c.events():
            data = event["data"]
            if event["action"] == "new_message" and data["chat_id"] == args.chat:
                if data["seq"] > shown:  # the unread snapshot may repeat the history shown
                    show(data, names)
                    shown = data["seq"]
            elif event["action"] == "member_added" and data["chat"]["id"] == args.chat:
                names.update({m["user_uuid"]: m["name"] for m in data["chat"]["members"]})
            elif event["action"] == "chat_deleted" and data["chat_id"] == args.chat:
                print("-- the chat was deleted", flush=True)
                return


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
