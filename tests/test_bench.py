"""`chatd bench`, run for real but tiny against the test server.

These check that the load generator works end to end — sockets, sends, deliveries counted
by id, the report files — never how fast anything is: the performance targets are judged
in the benchmark's own report, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
from prometheus_client import REGISTRY

from chatd.bench import batchcost, procs
from chatd.bench import main as bench_main
from chatd.bench.accounts import User, create_group
from chatd.bench.stats import Progress
from chatd.bench.workloads import cpu_ms_per_message
from chatd.client import Api
from tests.conftest import Server, bulk_users, scratch_database

TINY = ["--rates", "40", "--max-rate", "0", "--step-seconds", "1", "--grace", "1"]


def run_bench(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "results"
    assert bench_main([*argv, "--out", str(out)]) == 0
    reports = sorted(out.glob("*.json"))
    reports = [r for r in reports if r.name != "bench-state.json"]
    assert len(reports) == 1
    return json.loads(reports[0].read_text())


def check_steps(result: dict[str, Any], sockets: int, room_size: int) -> None:
    assert result["sockets"] == sockets
    (step,) = result["steps"]
    # Not step["ok"]: that also judges latency, and timing has no place in a unit test.
    assert step["sent"] > 0
    assert step["acked"] == step["sent"]
    assert step["expected_deliveries"] == room_size * step["acked"]
    assert step["delivered"] == step["expected_deliveries"]
    assert step["lost"] == step["duplicates"] == step["unacked"] == 0
    assert step["errors"] == {} and step["closes"] == {}
    latency = step["latency_ms"]
    assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]


def test_fanout_and_direct_against_chatd(server: Server, tmp_path: Path) -> None:
    url = server.base_url
    report = run_bench(tmp_path, "fanout", "--url", url, "--groups", "2", "--members", "3", *TINY)
    fanout = report["workloads"]["fanout"]
    check_steps(fanout, sockets=6, room_size=3)
    assert report["machine"]["cores"] >= 1
    # The server was found by its port: its CPU and memory are in the report.
    assert report["server"]["pid"] == server.process.pid
    assert fanout["steps"][0]["server_rss_mib"] > 0
    # Server and PostgreSQL CPU per message, the figure A/B comparisons go by.
    assert fanout["steps"][0]["cpu_ms_per_msg"] > 0
    # Messages per group commit in the step, from the server's /metrics.
    assert fanout["steps"][0]["sends_per_batch"] >= 1
    targets = {t["id"]: t for t in report["targets"]}
    # Measured on 2x3, not the targets' 10x10: shown, but neither passed nor failed.
    assert targets["fanout_messages_per_s"]["pass"] is None
    assert list((tmp_path / "results").glob("*-fanout.png"))

    report = run_bench(tmp_path / "direct", "direct", "--url", url, "--pairs", "2", *TINY)
    check_steps(report["workloads"]["direct"], sockets=4, room_size=2)


def test_baseline(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "baseline", "--groups", "2", "--members", "3", *TINY)
    baseline = report["workloads"]["baseline"]
    check_steps(baseline, sockets=6, room_size=3)
    assert baseline["setup"]["server"] == "bare broadcast"
    assert baseline["steps"][0]["sends_per_batch"] is None  # it commits nothing
    assert list((tmp_path / "results").glob("*-baseline.png"))


def test_biggroup(server: Server, tmp_path: Path) -> None:
    tiny = "--big-members 20 --big-senders 3 --big-rates 20 --step-seconds 2 --grace 1"
    report = run_bench(tmp_path, "biggroup", "--url", server.base_url, *tiny.split())
    big = report["workloads"]["biggroup"]
    assert big["setup"] == {"members": 20, "senders": 3}
    check_steps(big, sockets=20, room_size=20)
    assert big["steps"][0]["cpu_ms_per_msg"] > 0
    assert list((tmp_path / "results").glob("*-biggroup.png"))


async def test_a_big_group_is_filled_a_call_at_a_time(server: Server, database_url: str) -> None:
    tokens = await bulk_users(database_url, server, 25, "bench")
    users = [User("", "", "", user, token) for user, token in tokens.items()]
    chat_id = await create_group(server.base_url, users, "big", Progress(), per_call=10)
    async with Api(server.base_url, users[0].token) as owner:
        chat = await owner.chat(chat_id)
    assert [m["user_uuid"] for m in chat["members"]] == list(tokens)


async def test_batchcost_stores_each_way_and_reads_the_backends_cpu(database_url: str) -> None:
    async with scratch_database(database_url, "chatd_batchcost") as url:
        lines = await batchcost.measure(url, batches=5, rounds=1)
        assert [line.split(":")[0] for line in lines] == [
            "round 1, one round trip",
            "round 1,    transaction",
            "round 1,          floor",
        ]
        assert all("chatd CPU" in line for line in lines)
        conn = await asyncpg.connect(url)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM messages")
            watermark = await conn.fetchval("SELECT read_seq FROM chats WHERE name = 'batchcost'")
        finally:
            await conn.close()
        assert stored == 3 * (5 + 1)  # each way: a warm-up and five batches
        assert watermark == 0  # one sender: the others never read


async def test_batchcost_batches_of_several_sends_to_chats_and_by_members_in_turn(
    database_url: str,
) -> None:
    def batches_and_sends() -> tuple[float, float]:
        return (
            REGISTRY.get_sample_value("chatd_send_batch_size_count") or 0,
            REGISTRY.get_sample_value("chatd_send_batch_size_sum") or 0,
        )

    async with scratch_database(database_url, "chatd_batchcost_turns") as url:
        before = batches_and_sends()
        await batchcost.measure(url, batches=5, rounds=1, sends=4, senders=10, chats=2)
        after = batches_and_sends()
        # Two of the ways go through the writer: each a warm-up and five batches of four.
        assert (after[0] - before[0], after[1] - before[1]) == (2 * 6, 2 * 6 * 4)
        conn = await asyncpg.connect(url)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM messages")
            groups = await conn.fetch(
                "SELECT last_seq, read_seq FROM chats WHERE name = 'batchcost'"
            )
            senders = await conn.fetchval("SELECT count(DISTINCT sender_id) FROM messages")
        finally:
            await conn.close()
        assert stored == 3 * (5 + 1) * 4
        assert senders == 10
        # Each chat's ten senders in turn have all read up to its tenth-newest message:
        # the watermarks moved, in both chats, which shared the writer's batches.
        assert [g["last_seq"] for g in groups] == [2 * 6 * 4 // 2] * 2
        assert [g["read_seq"] for g in groups] == [g["last_seq"] - 9 for g in groups]


@pytest.mark.parametrize("sockets", [20])
def test_idle(server: Server, tmp_path: Path, sockets: int) -> None:
    report = run_bench(
        tmp_path,
        "idle",
        "--url",
        server.base_url,
        "--sockets",
        str(sockets),
        "--idle-users",
        "2",
        "--idle-hold",
        "0.5",
    )
    idle = report["workloads"]["idle"]
    assert idle["connected"] == idle["still_open_after_hold"] == sockets
    assert idle["connects_per_s"] > 0
    assert idle["rss_per_socket_kib"] is not None


def test_history_through_the_api(server: Server, tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "history",
        "--url",
        server.base_url,
        "--history-api-messages",
        "120",
        "--history-seconds",
        "0.5",
        "--history-concurrency",
        "2",
    )
    history = report["workloads"]["history"]
    assert history["messages"] == 120
    for key in ("sequential", "concurrent"):
        assert history[key]["pages"] > 0
        assert history[key]["failures"] == {}


def test_cpu_per_message() -> None:
    # 2 s at 50% + 30% of a core for 400 messages: 1.6 CPU seconds, 4 ms each.
    cpu = {"server_cpu_pct": 50.0, "postgres_cpu_pct": 30.0}
    assert cpu_ms_per_message(cpu, 2.0, 400) == 4.0
    assert cpu_ms_per_message({**cpu, "postgres_cpu_pct": None}, 2.0, 400) is None
    assert cpu_ms_per_message(cpu, 2.0, 0) is None


def _step(rate: float, p50: float, p99: float, cpu: float, lost: int = 0) -> dict[str, Any]:
    return {
        "offered_rate": rate,
        "messages_per_s": rate,
        "deliveries_per_s": rate * 10,
        "latency_ms": {"p50": p50, "p99": p99},
        "cpu_ms_per_msg": cpu,
        "server_cpu_pct": 60.0,
        "client_cpu_pct": 15.0,
        "lost": lost,
        "duplicates": 0,
        "unacked": 0,
        "errors": {},
        "closes": {},
    }


def test_targets_judge_the_500_and_1500_steps_and_the_generator() -> None:
    from chatd.bench.report import evaluate_targets

    steps = [_step(500, 3.0, 20.0, 0.5), _step(1500, 9.0, 40.0, 0.4), _step(3000, 50, 90, 0.2)]
    fanout = {"setup": {"groups": 10, "members": 10}, "steps": steps, "best": steps[-1]}
    targets = {t["id"]: t for t in evaluate_targets({"fanout": fanout})}
    assert targets["fanout_messages_per_s"]["measured"] == 3000
    assert targets["fanout_messages_per_s"]["pass"] is True
    assert (targets["fanout_p50_at_500"]["measured"], targets["fanout_p50_at_500"]["pass"]) == (
        3.0,
        True,
    )
    assert targets["fanout_p99_at_500"]["pass"] is False  # 20 ms > 15 ms
    assert targets["fanout_cpu_at_500"]["pass"] is True
    assert targets["fanout_cpu_at_1500"]["pass"] is False  # 0.4 ms > 0.35 ms
    assert targets["generator_share"]["measured"] == 0.25
    assert targets["generator_share"]["pass"] is True

    # A step that lost messages is shown but judges nothing; a missing step is not measured.
    steps = [_step(500, 3.0, 9.0, 0.5, lost=3), _step(1000, 9.0, 40.0, 0.4)]
    fanout = {"setup": {"groups": 10, "members": 10}, "steps": steps, "best": steps[-1]}
    targets = {t["id"]: t for t in evaluate_targets({"fanout": fanout})}
    assert targets["fanout_p99_at_500"]["measured"] == 9.0
    assert targets["fanout_p99_at_500"]["pass"] is None
    assert "lost" in targets["fanout_p99_at_500"]["note"]
    assert targets["fanout_cpu_at_1500"]["pass"] is None
    assert targets["fanout_cpu_at_1500"]["measured"] is None


def test_the_server_of_several_workers_is_the_process_above_them(tmp_path: Path) -> None:
    # A parent and its child both hold one listening socket, as `chatd serve --workers N`
    # and its workers do: the bench measures the parent (and so every child), whichever
    # of the two the system names as the listener.
    script = tmp_path / "listen.py"
    script.write_text(
        "import os, socket, sys, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(s.getsockname()[1], flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        port = int(parent.stdout.readline())
        child = psutil.Process(parent.pid).children()[0]
        assert procs.listening_pid(port) == parent.pid
        assert procs._topmost_listener(child.pid, port) == parent.pid
    finally:
        for proc in psutil.Process(parent.pid).children():
            proc.kill()
        parent.kill()
        parent.wait()


def test_cpu_of_a_child_that_ends_during_a_step_counts_from_the_step_on(tmp_path: Path) -> None:
    # A PostgreSQL backend (asyncpg replaces a pooled connection after 50,000 queries) or
    # a worker may end mid-step: its CPU since the step began counts, its CPU before not.
    script = tmp_path / "child.py"
    script.write_text(
        "import os, sys, time\n"
        "def burn(seconds):\n"
        "    end = time.process_time() + seconds\n"
        "    while time.process_time() < end: pass\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    burn(0.3); print('ready', flush=True)\n"
        "    sys.stdin.readline(); burn(0.3); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('reaped', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdin is not None and parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        group = procs.server_group(parent.pid)
        group.start()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "reaped"
        assert 0.25 <= group.cpu_seconds() <= 0.5
    finally:
        parent.kill()
        parent.wait()
