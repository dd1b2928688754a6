"""Real-browser tests: only collected with CHATD_BROWSER_TESTS=1.

They need the `playwright` Python package and a Chromium at /usr/bin/chromium (or
CHATD_CHROMIUM); no browser is ever downloaded.
"""

from __future__ import annotations

import os

if os.environ.get("CHATD_BROWSER_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]
