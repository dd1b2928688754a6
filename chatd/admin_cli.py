"""`chatd admin <subcommand>`: the /admin API's operations, run on the database directly.

The command builds a Node (so a revocation it makes reaches every running server, through
PostgreSQL and Redis alike) and calls the same functions as the REST API
(chatd/handlers/admin.py), as the actor "the command" (NULL in the audit log).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

import msgspec

from chatd.config import Settings
from chatd.handlers import admin
from chatd.node import Node
from chatd.protocol import ChatError


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return getpass.getpass("password: ")


async def _run(args: argparse.Namespace, settings: Settings, database_url: str) -> object:
    node = Node(settings, database_url)
    await node.start()
    try:
        command = args.admin_command
        if command == "create-user":
            role = "admin" if args.admin else "user"
            return await admin.create_user(node, None, args.name, args.email, _password(args), role)
        if command == "list":
            users, after = [], None
            while True:
                page = await admin.list_users(node, args.q, after, 200)
                users.extend(page.users)
                if len(page.users) < 200:
                    return users
                after = page.users[-1].user_uuid
        if command == "stats":
            return await admin.stats(node)
        user_id = await admin.find_user(node, args.user)
        if command == "delete":
            await admin.delete_user(node, None, user_id)
            return {"deleted": str(user_id)}
        changes = {
            "set-password": {"password": _password(args)} if command == "set-password" else {},
            "disable": {"disabled": True},
            "enable": {"disabled": False},
            "promote": {"role": "admin"},
            "demote": {"role": "user"},
        }[command]
        return await admin.update_user(node, None, user_id, **changes)
    finally:
        await node.stop()


def run_admin(args: argparse.Namespace, settings: Settings, database_url: str) -> int:
    """Run one admin subcommand; print its result as JSON. 0 on success, 1 when refused."""
    try:
        result = asyncio.run(_run(args, settings, database_url))
    except ChatError as exc:
        print(f"chatd admin: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    if isinstance(result, list):
        for item in result:
            print(msgspec.json.encode(item).decode())
    else:
        print(msgspec.json.encode(result).decode())
    return 0
