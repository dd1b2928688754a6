"""The dice bot as a webhook receiver: chatd POSTs the bot's events, the bot answers.

    CHATD_BOT_TOKEN=chatd_bot_... CHATD_WEBHOOK_SECRET=... \
        .venv/bin/uvicorn examples.webhook_bot:app --port 9000

Set the bot's webhook first (PATCH /bots/{id} {"webhook_url": "https://bot.example.com/"},
whose answer holds `webhook_secret`; chatd refuses private addresses unless
CHATD_OUTBOUND_ALLOW_PRIVATE=true, as for a bot on your own machine). It holds no socket:
each command reaches it as a signed POST, and the reply goes back in the answer.
"""

from __future__ import annotations

import os
import random

from chatd.bot import Bot, CommandEvent

bot = Bot(
    os.environ.get("CHATD_URL", "http://127.0.0.1:8000"),
    os.environ["CHATD_BOT_TOKEN"],
    webhook_secret=os.environ["CHATD_WEBHOOK_SECRET"],
)


@bot.command("roll", description="Roll a die: /roll (1-6)")
async def roll(event: CommandEvent) -> None:
    await event.reply(f"🎲 {random.randint(1, 6)}")


app = bot.asgi_app()
