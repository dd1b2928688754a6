"""Echo bot: answers every message from someone else, in every chat it is in.

    .venv/bin/python examples/echo_bot.py --email bot@example.com --password botpassword

Email and password may also come from CHATD_EMAIL and CHATD_PASSWORD; the server from
--url or CHATD_URL (default http://127.0.0.1:8000). Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

from chatd.client import Client
from chatd.protocol import NewMessage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("CHATD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--email", default=os.environ.get("CHATD_EMAIL"))
    parser.add_argument("--password", default=os.environ.get("CHATD_PASSWORD"))
    args = parser.parse_args()
    if not args.email or not args.password:
        parser.error("give --email and --password (or CHATD_EMAIL and CHATD_PASSWORD)")
    return args


async def main(args: argparse.Namespace) -> None:
    async with Client(args.url, email=args.email, password=args.password) as bot:
        print(f"echo bot running as {bot.user_uuid}", flush=True)
        async for event in bot.events():
            match event.typed:
                # Our own replies come back too: the guard leaves them alone.
                case NewMessage(data=message) if message.sender_uuid != bot.user_uuid:
                    await bot.send(message.chat_id, f"echo: {message.text}")
                    await bot.mark_read(message.id)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
