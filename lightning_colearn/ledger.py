"""Ledger: an append-only, hash-linked, persisted chain of proof-of-learning blocks.

Proof of federated learning (flexBlock's PoFL) records every round's winner:
the miner whose aggregated model scores best on a shared evaluation set adds
a block with the scores and the winning weights. This ledger fixes what that
implementation leaves out:

* **Linked.** Each block carries the previous block's hash, as in Nakamoto's
  chain (Bitcoin, 2008), and its own hash covers every field, so changing,
  removing or reordering any block breaks a link that :meth:`Ledger.verify`
  finds.
* **Validated.** :meth:`Ledger.validate` is what a validator does before it
  adopts a proposed block: the link, the hash, the weights' digest, the winner
  and, given a ``rescore`` function, the claimed winning score itself.
* **Persisted.** Blocks and their weights (safetensors bytes, never pickle)
  live in one SQLite file; every append is one transaction with
  ``synchronous=FULL``, so a crash leaves either the whole block or nothing.
  Reopening the file continues the chain.

The chain proves integrity, not authority: whoever can rewrite the file can
rewrite the whole chain from some block on. Keep (or publish) the head hash
somewhere else and compare it with :attr:`Ledger.head_hash` to detect that.

Examples:
    >>> import os, tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "chain.db")
    >>> with Ledger(path) as ledger:
    ...     b0 = ledger.append(round=0, winner=1, scores=[0.5, 0.8], weights={"w": torch.ones(2)})
    ...     b1 = ledger.append(round=1, winner=0, scores=[0.9, None], weights={"w": torch.zeros(2)})
    ...     print(len(ledger), b1.prev_hash == b0.hash, b1.winner_score)
    2 True 0.9
    >>> with Ledger(path) as ledger:  # reopened: the chain continues
    ...     b2 = ledger.append(round=2, winner=0, scores=[0.95], weights=ledger.load(1))
    ...     print(b2.index, b2.prev_hash == b1.hash, ledger.verify())
    2 True OK: 3 blocks verified
    >>> tmp.cleanup()
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time as _time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_colearn.functional.arithmetic import first_non_finite

__all__ = [
    "GENESIS_HASH",
    "Block",
    "BlockRefused",
    "Ledger",
    "LedgerError",
    "VerifyReport",
    "digest",
    "weights_from_bytes",
    "weights_to_bytes",
]

#: ``prev_hash`` of block 0.
GENESIS_HASH = "0" * 64

_APPLICATION_ID = 0x434C4C47  # "CLLG" in the SQLite header: marks the file as a ledger
_SCHEMA_VERSION = 1
_COLUMNS = ("idx", "prev_hash", "round", "winner", "scores", "digest", "time", "hash", "weights")
_SCHEMA = """CREATE TABLE blocks (
    idx INTEGER PRIMARY KEY,
    prev_hash TEXT NOT NULL,
    round INTEGER NOT NULL,
    winner INTEGER NOT NULL,
    scores TEXT NOT NULL,
    digest TEXT NOT NULL,
    time REAL NOT NULL,
    hash TEXT NOT NULL,
    weights BLOB NOT NULL
)"""
_HEADER = ", ".join(_COLUMNS[:-1])  # every column but the weights


class LedgerError(ValueError):
    """A block was refused, or the ledger is corrupt; the message names the block and what is wrong."""


class BlockRefused(LedgerError):
    """A proposed block failed a validator's check (:meth:`Ledger.validate`); the ledger is unchanged."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Block:
    """One round's record. ``hash`` is the SHA-256 of the canonical JSON of every other field.

    ``scores`` holds every candidate's score (``None``: that miner had no
    candidate); ``digest`` is the SHA-256 of the winning weights' safetensors
    bytes, which the ledger stores beside the block.
    """

    index: int
    prev_hash: str
    round: int
    winner: int
    scores: list[float | None]
    digest: str
    time: float
    hash: str

    def __hash__(self) -> int:  # the generated one would fail on the scores list
        return hash(self.hash)

    @classmethod
    def create(
        cls,
        index: int,
        prev_hash: str,
        round: int,
        winner: int,
        scores: Sequence[float | None],
        digest: str,
        time: float,
    ) -> Block:
        """A block with its ``hash`` computed from the other fields.

        An int ``time`` becomes a float, as SQLite's REAL column gives it back.
        """
        fields = dict(
            index=index, prev_hash=prev_hash, round=round, winner=winner, scores=list(scores), digest=digest,
            time=float(time) if _is_int(time) else time,
        )
        return cls(**fields, hash=_hash_fields(fields))

    def compute_hash(self) -> str:
        """The hash this block's fields give (equal to ``self.hash`` unless it was tampered with)."""
        return _hash_fields(_fields(self))

    @property
    def winner_score(self) -> float:
        """The winning candidate's score, ``scores[winner]``."""
        problem = _winner_problem(self)
        if problem:
            raise LedgerError(f"block {self.index}: {problem}")
        return float(self.scores[self.winner])


_HASHED = ("index", "prev_hash", "round", "winner", "scores", "digest", "time")


def _fields(block: Block) -> dict[str, Any]:
    """Every field the block hash covers (all but ``hash``)."""
    return {k: getattr(block, k) for k in _HASHED}


def _hash_fields(fields: dict[str, Any]) -> str:
    bad = _fields_problem(fields)
    if bad:
        raise LedgerError(f"block {fields['index']}: {bad}")
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _fields_problem(f: Mapping[str, Any]) -> str | None:
    """What is malformed in a block's fields (types and ranges; not the chain), or None."""
    for key in ("index", "round", "winner"):
        if not _is_int(f[key]):
            return f"{key} must be an int, got {f[key]!r}"
    if f["index"] < 0 or f["round"] < 0:
        return f"index and round must be >= 0, got index={f['index']}, round={f['round']}"
    for key in ("prev_hash", "digest"):
        if not (isinstance(f[key], str) and len(f[key]) == 64):
            return f"{key} must be a 64-character SHA-256 hex string, got {f[key]!r}"
    if not isinstance(f["scores"], list):
        return f"scores must be a list, got {type(f['scores']).__name__}"
    for i, s in enumerate(f["scores"]):
        if s is not None and (not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s)):
            return f"scores must be finite numbers or None, got {s!r} at position {i}"
    if not isinstance(f["time"], float) or not math.isfinite(f["time"]):  # a float: SQLite's REAL reads back as one
        return f"time must be a finite float, got {f['time']!r}"
    return None


def _winner_problem(block: Block) -> str | None:
    n = len(block.scores) if isinstance(block.scores, list) else 0
    if not (_is_int(block.winner) and 0 <= block.winner < n):
        return f"winner {block.winner!r} is out of range for {n} scores (0..{n - 1})"
    if block.scores[block.winner] is None:
        return f"winner {block.winner} has no score (None: that miner had no candidate)"
    return None


def weights_to_bytes(state: Mapping[str, Tensor]) -> bytes:
    """Serialise a state dict with safetensors (contiguous CPU copies); the same tensors give the same bytes.

    :class:`LedgerError` for anything but ``str -> Tensor`` entries and for NaN or inf values: a block's
    model must be finite.
    """
    from safetensors.torch import save

    if not isinstance(state, Mapping):
        raise LedgerError(f"weights must be a mapping of name -> Tensor or safetensors bytes, got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise LedgerError(f"weights must map str -> Tensor, got {name!r} -> {type(value).__name__}")
    bad = first_non_finite(state)
    if bad:
        raise LedgerError(f"weights {bad!r} hold NaN or inf values; a block's model must be finite")
    # clone: tied/shared tensors would make safetensors refuse the dict
    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})


def weights_from_bytes(data: bytes) -> dict[str, Tensor]:
    """Deserialise safetensors bytes; :class:`LedgerError` if they are corrupt or truncated."""
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except Exception as err:  # safetensors raises its own error types for bad bytes
        raise LedgerError(f"weights are not readable safetensors bytes: {err}") from err


def digest(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class VerifyReport:
    """The result of :meth:`Ledger.verify`.

    ``blocks`` counts the blocks verified from genesis (on failure, the ones
    before ``first_bad``); ``reason`` says what is wrong with ``first_bad``.
    A damaged database file (e.g. truncated) fails with ``first_bad=None``:
    SQLite's own check already fails, before any block is read.
    """

    ok: bool
    blocks: int
    first_bad: int | None
    reason: str

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.blocks} block{'' if self.blocks == 1 else 's'} verified"
        if self.first_bad is None:  # the file itself is damaged: no block can be named
            return self.reason
        return f"block {self.first_bad}: {self.reason}"


Rescore = Callable[[dict[str, Tensor]], float]


class Ledger:
    """An append-only chain of :class:`Block` s and their weights in one SQLite file.

    Args:
        path: the database file; created (with its parent directories) if missing.
        readonly: open an existing ledger without ever writing to it (a missing
            file is then an error, and :meth:`commit` refuses).
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._sound: tuple[int, str] | None = None  # (blocks, head hash) of the chain last verified here
        if self.path.is_dir():
            raise LedgerError(f"{self.path} is a directory; a ledger is one SQLite file (e.g. {self.path / 'ledger.db'})")
        if readonly and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}: the file does not exist")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        target = f"{self.path.resolve().as_uri()}?mode=ro" if readonly else str(self.path)
        try:
            self._conn = sqlite3.connect(target, uri=readonly, isolation_level=None)  # transactions are explicit
        except sqlite3.Error as err:
            raise LedgerError(f"cannot open {self.path} as a ledger: {err}") from err
        try:
            self._conn.execute("PRAGMA synchronous=FULL")
            self._open_schema()
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise LedgerError(f"{self.path} is not a ledger database: {err}") from err
        except LedgerError:
            self._conn.close()
            raise

    def _open_schema(self) -> None:
        with self._conn:
            if not self.readonly:
                self._conn.execute("BEGIN IMMEDIATE")  # two processes creating one file: one creates, one sees it
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            tables = [r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            if app_id == 0 and not tables and not self.readonly:
                self._conn.execute(_SCHEMA)
                self._conn.execute(f"PRAGMA application_id={_APPLICATION_ID}")
                self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                return
        if app_id != _APPLICATION_ID or "blocks" not in tables:
            what = f"an SQLite database with tables {sorted(tables)}" if tables else "an empty SQLite database"
            raise LedgerError(f"{self.path} is not a ledger database ({what})")
        columns = tuple(r[1] for r in self._conn.execute("PRAGMA table_info(blocks)"))
        if columns != _COLUMNS:
            raise LedgerError(f"{self.path}: table blocks has columns {list(columns)}, a ledger has {list(_COLUMNS)}")

    # ------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]

    def __iter__(self) -> Iterator[Block]:
        return iter(self._headers(strict=True))

    def listing(self) -> list[Block]:
        """Every stored block header in index order, for display: a row whose scores are not valid JSON keeps
        them as text instead of raising (:meth:`verify` says what is wrong with it)."""
        return self._headers(strict=False)

    def _headers(self, strict: bool) -> list[Block]:
        rows = self._conn.execute(f"SELECT {_HEADER} FROM blocks ORDER BY idx").fetchall()
        return [_to_block(row, strict) for row in rows]

    def block(self, index: int) -> Block:
        """Block ``index`` (negative counts from the end, as for a list)."""
        if not _is_int(index):
            raise TypeError(f"block index must be an int, got {index!r}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"block index {index!r} out of range: the ledger has {n} blocks (valid: 0..{n - 1})")
        index += n if index < 0 else 0
        with self._reading():
            row = self._conn.execute(f"SELECT {_HEADER} FROM blocks WHERE idx=?", (index,)).fetchone()
            if row is None:
                raise LedgerError(f"block {index}: missing from the database (run verify)")
            return _to_block(row)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Blame what a read finds wrong on the file when SQLite finds the file damaged (a truncated file's rows
        read as garbage, which would otherwise be blamed on one block)."""
        try:
            yield
        except (LedgerError, sqlite3.DatabaseError) as err:
            damage = self._damage()
            if damage is not None:
                raise LedgerError(f"{self.path}: {damage}") from err
            if isinstance(err, sqlite3.DatabaseError):
                raise LedgerError(f"{self.path}: cannot be read: {err}") from err
            raise

    def _damage(self) -> str | None:
        """What SQLite's page-level check finds wrong with the file, or None."""
        try:
            lines = [line for r in self._conn.execute("PRAGMA quick_check(3)") for line in r[0].splitlines()]
        except sqlite3.DatabaseError as err:
            return f"the database file is damaged ({err})"
        if lines == ["ok"]:
            return None
        found = "; ".join(line for line in lines if not line.startswith("***"))
        return f"the database file is damaged (SQLite quick_check: {found})"

    @property
    def last(self) -> Block | None:
        """The newest block, or None for an empty ledger."""
        with self._reading():
            row = self._conn.execute(f"SELECT {_HEADER} FROM blocks ORDER BY idx DESC LIMIT 1").fetchone()
            return None if row is None else _to_block(row)

    @property
    def head_hash(self) -> str:
        """The hash the next block must link to (:data:`GENESIS_HASH` when empty)."""
        last = self.last
        return GENESIS_HASH if last is None else last.hash

    def load(self, index: int) -> dict[str, Tensor]:
        """Block ``index``'s weights, after checking them against the block's digest."""
        block = self.block(index)
        with self._reading():
            (data,) = self._conn.execute("SELECT weights FROM blocks WHERE idx=?", (block.index,)).fetchone()
            if not isinstance(data, bytes) or digest(data) != block.digest:
                raise LedgerError(f"block {block.index}: weights do not match their digest")
        try:
            return weights_from_bytes(data)
        except LedgerError as err:
            raise LedgerError(f"block {block.index}: {err}") from err

    # ------------------------------------------------------------- writing
    def propose(
        self,
        round: int,
        winner: int,
        scores: Sequence[float | None],
        weights: Mapping[str, Tensor] | bytes,
        time: float | None = None,
    ) -> tuple[Block, bytes]:
        """Build the next block and its weights bytes, without storing anything (on a chain that passes :meth:`check_chain`)."""
        self.check_chain()
        data = bytes(weights) if isinstance(weights, (bytes, bytearray, memoryview)) else weights_to_bytes(weights)
        index = len(self)
        block = Block.create(
            index=index, prev_hash=self.head_hash, round=round, winner=winner,
            scores=_as_scores(index, scores), digest=digest(data), time=_time.time() if time is None else time,
        )
        return block, data

    def validate(self, block: Block, weights: bytes, rescore: Rescore | None = None, tol: float = 1e-6) -> None:
        """Check a proposed block as a validator would before adopting it.

        Raises :class:`LedgerError` naming the first failed check.

        The block must be the next one (``index == len(self)``), link to
        :attr:`head_hash`, hash to its ``hash``, carry the digest of
        ``weights``, name a winner that has a score and, if ``rescore`` is
        given, its weights must score ``block.winner_score`` within ``tol``.
        """
        _require_block(block)
        n, last = len(self), self.last
        if last is not None and last.index != n - 1:
            raise LedgerError(f"block {block.index}: the ledger holds {n} blocks but the last is {last.index}; run verify")
        problem = _block_problem(block, weights, n, self.head_hash, rescore, tol)
        if problem:
            raise BlockRefused(f"block {block.index}: {problem}")

    def commit(self, block: Block, weights: bytes, rescore: Rescore | None = None, tol: float = 1e-6) -> Block:
        """Validate ``block`` (re-scoring it if ``rescore`` is given) and store it with its weights in one transaction.

        A refused block raises :class:`BlockRefused`; a block that could not be
        stored raises :class:`LedgerError`. Either way nothing is written.
        """
        _require_block(block)  # before its index is read
        if self.readonly:
            raise LedgerError(f"block {block.index}: {self.path} is open read-only")
        try:
            with self._conn:  # BEGIN IMMEDIATE: nobody appends between our check and our insert
                self._conn.execute("BEGIN IMMEDIATE")
                self.check_chain()
                if isinstance(block.index, int) and 0 <= block.index < len(self):  # another writer got there first
                    other = self.block(block.index)
                    # (a LedgerError, not BlockRefused: nothing is wrong with the block, the chain moved on under it)
                    raise LedgerError(f"block {block.index}: another writer appended block {other.index} first (round "
                                       f"{other.round}, hash {other.hash[:12]}...); this block was not written: "
                                       f"propose again after block {len(self) - 1}")
                self.validate(block, weights, rescore, tol)
                self._conn.execute(
                    f"INSERT INTO blocks ({', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (block.index, block.prev_hash, block.round, block.winner, json.dumps(block.scores),
                     block.digest, block.time, block.hash, sqlite3.Binary(bytes(weights))),
                )
        except sqlite3.Error as err:
            raise LedgerError(f"block {block.index}: could not be stored in {self.path}: {err}") from err
        self._sound = (block.index + 1, block.hash)
        return block

    def check_chain(self) -> None:
        """Raise :class:`LedgerError` if the stored chain fails :meth:`verify` (without re-scoring).

        :meth:`commit` calls it first: a block appended to a tampered or damaged
        chain would link to a head that no longer proves anything. The full
        check runs once per connection, and again when the head is not the one
        this connection checked or appended, or no longer hashes to its stored
        hash (another writer changed it); otherwise only the head's hash is
        recomputed, so appending stays cheap on a long chain.
        """
        try:
            last = self.last
            head = (0, GENESIS_HASH) if last is None else (last.index + 1, last.hash)
            if head == self._sound and (last is None or last.compute_hash() == last.hash):
                return
        except (LedgerError, sqlite3.DatabaseError):
            head = None
        report = self.verify()
        if not report:
            raise LedgerError(f"{self.path} fails verification ({report}); a broken chain is not extended: "
                              "restore the file from a copy or start a new ledger")
        self._sound = head

    def append(
        self,
        round: int,
        winner: int,
        scores: Sequence[float | None],
        weights: Mapping[str, Tensor] | bytes,
        rescore: Rescore | None = None,
        time: float | None = None,
    ) -> Block:
        """Propose, validate (re-scoring if ``rescore`` is given) and commit the next block."""
        block, data = self.propose(round, winner, scores, weights, time=time)
        return self.commit(block, data, rescore)

    # ------------------------------------------------------------- auditing
    def verify(self, rescore: Rescore | None = None, tol: float = 1e-6) -> VerifyReport:
        """Recompute the chain from genesis: indices, links, hashes, digests and (optionally) the winning scores."""
        # a truncated or overwritten file can still open; its rows then read as garbage, which would be
        # blamed on one block: SQLite's page-level check says what happened
        damage = self._damage()
        if damage is not None:
            return VerifyReport(False, 0, None, damage)
        prev, count = GENESIS_HASH, 0
        for row in self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM blocks ORDER BY idx"):
            if row[0] != count:
                return VerifyReport(False, count, count, f"missing (the next stored block has index {row[0]})")
            try:
                block = _to_block(row[:-1])
            except LedgerError as err:
                return VerifyReport(False, count, count, str(err).split(": ", 1)[1])
            problem = _block_problem(block, row[-1], count, prev, rescore, tol)
            if problem:
                return VerifyReport(False, count, count, problem)
            prev, count = block.hash, count + 1
        return VerifyReport(True, count, None, "")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"


def _as_scores(index: int, scores: Sequence[float | None]) -> list[float | None]:
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise LedgerError(f"block {index}: scores must be a list of numbers or None (one per miner), got {_shorten(scores)}")
    out: list[float | None] = []
    for i, s in enumerate(scores):
        if s is None:
            out.append(None)
            continue
        try:
            if isinstance(s, bool):
                raise TypeError
            out.append(float(s))
        except (TypeError, ValueError):
            raise LedgerError(f"block {index}: scores must be numbers or None, got {s!r} at position {i}") from None
    return out


def _to_block(row: tuple, strict: bool = True) -> Block:
    index = row[0]
    try:
        scores = json.loads(row[4])
    except (TypeError, ValueError, RecursionError):  # RecursionError: a crafted, deeply nested cell
        if not strict:
            scores = row[4]
        else:
            raise LedgerError(f"block {index}: scores are not valid JSON: {_shorten(row[4])}") from None
    return Block(index, row[1], row[2], row[3], scores, row[5], row[6], row[7])


def _require_block(block: object) -> None:
    if not isinstance(block, Block):
        raise BlockRefused(f"expected a Block (from Ledger.propose), got {type(block).__name__}")


def _shorten(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _block_problem(
    block: Block, weights: Any, index: int, prev_hash: str, rescore: Rescore | None, tol: float
) -> str | None:
    """The first thing wrong with ``block`` (a :class:`Block`) as block number ``index`` after ``prev_hash``, or None."""
    if block.index != index:
        return f"index is {block.index!r}, the next block must be {index}"
    if block.prev_hash != prev_hash:
        return f"prev_hash {str(block.prev_hash)[:12]}... does not link to the previous block's hash {prev_hash[:12]}..."
    bad = _fields_problem(_fields(block))
    if bad:
        return bad
    if block.compute_hash() != block.hash:
        return "hash does not match the block's contents"
    if not isinstance(weights, (bytes, bytearray, memoryview)) or digest(bytes(weights)) != block.digest:
        return "weights do not match their digest"
    bad = _winner_problem(block)
    if bad:
        return bad
    try:
        state = weights_from_bytes(weights)
    except LedgerError as err:
        return str(err)
    bad = first_non_finite(state)
    if bad:
        return f"weights {bad!r} hold NaN or inf values"
    if rescore is not None:
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        score = float(rescore(state))
        if not abs(score - block.winner_score) <= tol:  # also refuses a NaN re-score
            return f"claimed winner score {block.winner_score!r} but its weights re-score {score!r} (tol {tol})"
    return None
