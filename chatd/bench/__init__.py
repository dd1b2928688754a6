"""`chatd bench`: load generators that drive a running chatd over real sockets."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    print("chatd bench: not implemented yet")
    return 2
