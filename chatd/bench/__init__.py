"""`chatd bench`: load generators that drive a running chatd over real sockets.

    chatd bench all --url http://127.0.0.1:8000 --database-url postgresql://.../chatd

Workloads: fanout (groups of members all sending), direct (1:1 pairs), biggroup (one
group of 1,000 members, a few of them sending), idle (many quiet
authenticated sockets), history (keyset pages of a 1M-message chat), search (GET /search
for a common word in a 1M-message database) and baseline (the fanout load against a bare
broadcast server the bench starts itself). Each run prints a
table, and writes bench-results/<time>-<workload>.json and a PNG chart. docs/performance.md
explains the measures and holds the latest figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# `all` runs them in this order: biggroup after idle, whose RSS per socket needs a server
# that has not held a thousand sockets yet (Python keeps the memory it freed).
WORKLOADS = ("baseline", "fanout", "direct", "history", "idle", "biggroup", "search")
DEFAULT_RATES = "500,1000,1500,2000,2500,3000,4000,6000,8000"


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("rates are numbers separated by commas") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def _at_least_two(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError("a group needs at least 2 members")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd bench",
        description="Load-test a running chatd over real sockets (see docs/performance.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "workload",
        choices=(*WORKLOADS, "all"),
        help="what to run; 'all' runs every workload into one report",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the chatd to load")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="folder for the JSON report, the PNG chart and the state file",
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        help="chatd's pid for CPU/RSS (default: whoever listens on --url's port)",
    )
    parser.add_argument(
        "--reuse-users",
        action="store_true",
        help="reuse the users (and seeded history chat) of an earlier run, kept in "
        "OUT/bench-state.json, instead of registering new ones",
    )
    steps = parser.add_argument_group("fanout, direct, biggroup and baseline")
    steps.add_argument("--groups", type=int, default=10, help="fanout: number of groups")
    steps.add_argument("--members", type=int, default=10, help="fanout: members per group")
    steps.add_argument("--pairs", type=int, default=50, help="direct: number of 1:1 chats")
    steps.add_argument(
        "--rates",
        type=_rates,
        default=_rates(DEFAULT_RATES),
        help="offered rates to step through, messages/s in total",
    )
    steps.add_argument(
        "--max-rate",
        type=float,
        default=32000,
        help="after the listed rates, keep doubling while steps pass, up to this "
        "(0: only the listed rates)",
    )
    steps.add_argument("--step-seconds", type=float, default=10, help="sending time per step")
    steps.add_argument(
        "--grace",
        type=float,
        default=2,
        help="seconds to drain after each step before counting losses",
    )
    steps.add_argument(
        "--stop-p99-ms", type=float, default=250, help="stop stepping when a step's p99 passes this"
    )
    steps.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="load generator processes (more for high rates on more cores)",
    )
    steps.add_argument(
        "--connect-concurrency", type=int, default=64, help="socket handshakes in flight at once"
    )
    big = parser.add_argument_group("biggroup")
    big.add_argument(
        "--big-members", type=_at_least_two, default=1000, help="members, one socket each"
    )
    big.add_argument("--big-senders", type=int, default=5, help="members who send")
    big.add_argument(
        "--big-rates",
        type=_rates,
        default=_rates("5,20"),
        help="offered rates to step through, messages/s in total (no doubling after)",
    )
    idle = parser.add_argument_group("idle")
    idle.add_argument("--sockets", type=int, default=10000, help="idle sockets to open")
    idle.add_argument(
        "--idle-users",
        type=int,
        default=100,
        help="users the idle sockets log in as (each user holds several sockets)",
    )
    idle.add_argument(
        "--idle-hold",
        type=float,
        default=5,
        help="seconds to hold the sockets open before weighing the server",
    )
    idle.add_argument(
        "--source-addrs",
        type=int,
        default=0,
        help="bind sockets to this many source addresses 127.0.0.2.. (0: one per "
        "20,000 sockets) so ephemeral ports do not run out",
    )
    history = parser.add_argument_group("history")
    history.add_argument(
        "--database-url",
        help="chatd's PostgreSQL, to seed the history chat with SQL (without it "
        "a smaller chat is seeded through the API)",
    )
    history.add_argument(
        "--history-messages",
        type=int,
        default=1_000_000,
        help="messages in the history chat (seeded with SQL)",
    )
    history.add_argument(
        "--history-api-messages",
        type=int,
        default=20_000,
        help="messages seeded through the API when there is no --database-url",
    )
    history.add_argument(
        "--history-seconds",
        type=float,
        default=10,
        help="seconds of each measurement (sequential, then concurrent)",
    )
    history.add_argument(
        "--history-concurrency",
        type=int,
        default=8,
        help="connections of the throughput measurement",
    )
    _search_options(parser)
    return parser


# What `chatd bench` needs beyond the server: the `bench` extra (pyproject.toml).
EXTRA_MODULES = ("httpx", "psutil", "matplotlib")


def _search_options(parser: argparse.ArgumentParser) -> None:
    search = parser.add_argument_group("search (seeded with SQL: needs --database-url)")
    search.add_argument("--search-messages", type=int, default=1_000_000, help="messages")
    search.add_argument("--search-chats", type=int, default=200, help="groups they are in")
    search.add_argument(
        "--search-member-of", type=int, default=20, help="of those, groups the searcher is in"
    )
    search.add_argument("--search-seconds", type=float, default=20, help="time per query")


def missing_extra() -> list[str]:
    """The modules of the `bench` extra that are not installed."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if missing := missing_extra():
        print(
            f"chatd bench needs {' and '.join(missing)}, which the server does not: "
            "install them with  pip install 'chatd[bench]'",
            file=sys.stderr,
        )
        return 2
    from chatd.bench import procs, report, workloads
    from chatd.bench.accounts import State
    from chatd.bench.stats import Progress

    base_url = args.url.rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        print("chatd bench: --url must be http://host:port", file=sys.stderr)
        return 2
    server_pid = args.server_pid
    if server_pid is None and workloads.is_loopback(parts.hostname):
        server_pid = procs.listening_pid(parts.port or 80)
    started = datetime.now(UTC)
    progress = Progress()
    ctx = workloads.Context(
        args=args,
        base_url=base_url,
        state=State(args.out / "bench-state.json", base_url),
        progress=progress,
        run_id=workloads.new_run_id(),
        server_pid=server_pid,
    )
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    needs_chatd = [n for n in names if n != "baseline"]
    if needs_chatd and not _healthy(base_url):
        print(f"chatd bench: no chatd answers at {base_url}/healthz", file=sys.stderr)
        return 2
    if server_pid is None and needs_chatd:
        progress.done("note: chatd's process was not found: no server CPU/RSS (give --server-pid)")

    results: dict[str, Any] = {}
    failed = False
    for name in names:
        progress(f"{name}: starting", force=True)
        try:
            if name == "idle":
                results[name] = workloads.run_idle(ctx)
            elif name == "history":
                results[name] = run_history(ctx)
            elif name == "search":
                from chatd.bench import search

                results[name] = search.run(ctx)
            else:
                results[name] = workloads.run_stepped(ctx, name)
        except Exception as exc:  # one workload failing must not lose the others' report
            failed = True
            results[name] = {"workload": name, "error": f"{type(exc).__name__}: {exc}"}
            progress.done(f"{name}: FAILED: {exc}")
    progress.done()

    full = {
        "version": 1,
        "workload": args.workload,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "url": base_url,
        "commit": procs.chatd_commit(server_pid),
        "machine": procs.machine_info(server_pid),
        "server": procs.process_info(server_pid) if server_pid else None,
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "database_url"
        },
        "workloads": results,
    }
    full["targets"] = report.evaluate_targets(results)
    stem = args.out / f"{started.strftime('%Y%m%dT%H%M%SZ')}-{args.workload}"
    report.write_json(full, stem.with_suffix(".json"))
    print(report.render(full))
    print(f"report: {stem.with_suffix('.json')}")
    if report.write_chart(full, stem.with_suffix(".png")):
        print(f"chart:  {stem.with_suffix('.png')}")
    return 1 if failed else 0


def _healthy(base_url: str) -> bool:
    import httpx

    try:
        return httpx.get(base_url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def run_history(ctx: Any) -> dict[str, Any]:
    from chatd.bench import accounts, history, workloads

    args = ctx.args
    users = asyncio.run(
        accounts.make_users(ctx.base_url, 2, ctx.state, "history", args.reuse_users, ctx.progress)
    )
    kept = ctx.state.data.get("history") if args.reuse_users else None
    if kept and kept.get("owner") != users[0].uuid:
        kept = None
    if kept:
        chat_id = kept["chat_id"]
    else:
        chat_id = asyncio.run(
            accounts.create_chats(ctx.base_url, [users], "group", "bench history", ctx.progress)
        )[0]
    if args.database_url:
        messages = asyncio.run(
            history.seed_sql(
                args.database_url, chat_id, users[0].uuid, args.history_messages, ctx.progress
            )
        )
        ids = asyncio.run(history.sample_ids_sql(args.database_url, chat_id, messages, 5000))
        seeded = "with SQL"
        ctx.state.data["history"] = {
            "chat_id": chat_id,
            "owner": users[0].uuid,
            "messages": messages,
        }
        ctx.state.save()
    else:
        sent = asyncio.run(
            history.seed_api(
                ctx.ws_base, users[0].token, chat_id, args.history_api_messages, ctx.progress
            )
        )
        messages = len(sent)
        ids = sent[history.PAGE :]
        seeded = "through the API (no --database-url: fewer messages than the 1M target)"
    result: dict[str, Any] = {
        "workload": "history",
        "chat_id": chat_id,
        "messages": messages,
        "seeded_via": seeded,
        "page_size": history.PAGE,
    }
    server = ctx.server_group()
    workloads.wait_quiet(server, ctx.postgres_group(), ctx.progress, "history")
    for key, concurrency in (("sequential", 1), ("concurrent", args.history_concurrency)):
        ctx.progress(f"history: {key} pages for {args.history_seconds:g}s", force=True)
        meter = workloads.CpuMeter({"server": server, "postgres": ctx.postgres_group()})
        meter.start()
        result[key] = asyncio.run(
            history.measure(
                ctx.base_url, users[0].token, chat_id, ids, concurrency, args.history_seconds
            )
        )
        result[key].update(meter.read())
    seq, conc = result["sequential"], result["concurrent"]
    ctx.progress.done(
        f"history: p99 {seq['latency_ms']['p99']} ms sequential ({seq['pages_per_s']:g} pages/s), "
        f"{conc['pages_per_s']:g} pages/s at concurrency {conc['concurrency']}"
    )
    return result
