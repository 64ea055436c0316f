"""The ``colearn-ledger`` command: audit and list a :class:`~lightning_colearn.ledger.Ledger` file.

The ledger is opened read-only: auditing never writes to it.

Examples::

    colearn-ledger verify outputs/run/ledger.db   # "OK: 12 blocks verified" (exit 0) or the first bad block (exit 1)
    colearn-ledger show outputs/run/ledger.db     # one row per block

A missing or non-ledger file is a one-line ``colearn-ledger: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from lightning_colearn.ledger import Block, Ledger, LedgerError

__all__ = ["main"]

PROG = "colearn-ledger"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``colearn-ledger``; returns the exit status (0 ok, 1 verification failed, 2 unusable file)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Audit a lightning-colearn proof-of-learning ledger.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{verify,show}")
    commands.add_parser("verify", help="recompute the chain from genesis; exit 1 at the first bad block").add_argument(
        "path", help="the ledger's SQLite file"
    )
    commands.add_parser("show", help="list the blocks").add_argument("path", help="the ledger's SQLite file")
    args = parser.parse_args(argv)
    try:
        with Ledger(args.path, readonly=True) as ledger:
            if args.command == "verify":
                report = ledger.verify()
                print(report)
                return 0 if report else 1
            _show(ledger.listing())
            return 0
    except LedgerError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


def _show(blocks: list[Block]) -> None:
    rows = [("index", "round", "winner", "winner score", "digest", "hash", "time")]
    rows += [
        (str(b.index), str(b.round), str(b.winner), _score(b), str(b.digest)[:12], str(b.hash)[:12], _iso(b.time))
        for b in blocks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i < 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())


def _score(block: Block) -> str:
    try:
        return f"{block.winner_score:.6g}"
    except LedgerError:  # a tampered row is still listed; verify says what is wrong
        return "-"


def _iso(t: object) -> str:
    try:
        return datetime.fromtimestamp(float(t), tz=timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


if __name__ == "__main__":
    sys.exit(main())
