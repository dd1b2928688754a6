"""The bare broadcast server the `baseline` workload measures chatd against.

The same stack as chatd — Starlette on uvicorn with uvloop, httptools, the sans-I/O
websockets implementation, no per-message deflate — and nothing else: no authentication,
no database, no JSON parsing. A socket joins the group named in its URL
(`/ws?group=3`), and every frame it sends is forwarded, as the same string, to every
socket of the group, the sender's included (as chatd echoes `new_message` to the sender).
So chatd's deliveries/s divided by this server's shows what chatd's work costs.

Run by the bench in a subprocess: `python -m chatd.bench.baseline --port 8801`.
"""

from __future__ import annotations

import argparse
import contextlib

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MAX_FRAME_BYTES = 64 * 1024  # as chatd

groups: dict[str, set[WebSocket]] = {}


async def healthz(request: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def broadcast(websocket: WebSocket) -> None:
    await websocket.accept()
    members = groups.setdefault(websocket.query_params.get("group", ""), set())
    members.add(websocket)
    try:
        while True:
            text = await websocket.receive_text()
            for peer in tuple(members):
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                    await peer.send_text(text)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        members.discard(websocket)


app = Starlette(routes=[Route("/healthz", healthz), WebSocketRoute("/ws", broadcast)])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="bare WebSocket broadcast server (bench)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME_BYTES,
        ws_per_message_deflate=False,
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
