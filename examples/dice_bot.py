"""Dice and poll bot: /roll and /poll in any group it is added to, over the socket.

    CHATD_BOT_TOKEN=chatd_bot_... .venv/bin/python examples/dice_bot.py

The token comes from POST /bots (docs/bots.md); the server from CHATD_URL (default
http://127.0.0.1:8000). Add the bot to a group, then type "/roll 2d6" or
"/poll Lunch? | pizza | sushi". Stop it with Ctrl-C.
"""

from __future__ import annotations

import os
import random
import re

from chatd.bot import Bot, ChatEvent, CommandEvent, MessageEvent

bot = Bot(os.environ.get("CHATD_URL", "http://127.0.0.1:8000"), os.environ["CHATD_BOT_TOKEN"])
DICE = re.compile(r"^(\d{0,2})d(\d{1,3})$")
polls: dict[int, dict[str, set[str]]] = {}  # per chat: option -> voters


@bot.command("roll", description="Roll dice: /roll 2d6 (default 1d6)")
async def roll(event: CommandEvent) -> None:
    match = DICE.match(event.args or "1d6")
    if match is None:
        await event.reply("Usage: /roll 2d6")
        return
    count, sides = int(match[1] or 1), int(match[2])
    if not (1 <= count <= 20 and 2 <= sides <= 100):
        await event.reply("Between 1 and 20 dice of 2 to 100 sides, please.")
        return
    rolls = [random.randint(1, sides) for _ in range(count)]
    await event.reply(f"🎲 {event.args or '1d6'}: {' + '.join(map(str, rolls))} = {sum(rolls)}")


@bot.command("poll", description="Start a poll: /poll Question? | option | option")
async def poll(event: CommandEvent) -> None:
    question, *options = [part.strip() for part in event.args.split("|")]
    if not question or len(options) < 2:
        await event.reply("Usage: /poll Question? | option | option")
        return
    polls[event.chat_id] = {option.lower(): set() for option in options}
    await event.reply(f"📊 {question} Vote with /vote <option>: {', '.join(options)}")


@bot.command("vote", description="Vote in the chat's poll: /vote option")
async def vote(event: CommandEvent) -> None:
    votes = polls.get(event.chat_id)
    if votes is None or event.args.lower() not in votes:
        await event.reply("No such option (start one with /poll).")
        return
    for voters in votes.values():
        voters.discard(event.sender_uuid)
    votes[event.args.lower()].add(event.sender_uuid)
    tally = ", ".join(f"{option}: {len(voters)}" for option, voters in votes.items())
    await event.reply(f"Votes: {tally}")


@bot.on_event("member_added")
async def hello(event: ChatEvent) -> None:
    if bot.user_uuid in event.data.user_uuids:
        await event.reply("Hello! Try /roll 2d6 or /poll Lunch? | pizza | sushi")


@bot.on_message
async def mentioned(event: MessageEvent) -> None:
    if bot.user_uuid in event.message.mentions:
        await event.reply("You called? Try /roll.")


if __name__ == "__main__":
    print("dice bot running (Ctrl-C stops it)", flush=True)
    bot.run()
