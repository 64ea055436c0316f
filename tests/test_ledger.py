"""Ledger: a hash-linked, persisted chain that continues after reopening and detects or refuses tampering."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_colearn import ledger_cli
from lightning_colearn.ledger import (
    GENESIS_HASH,
    Block,
    BlockRefused,
    Ledger,
    LedgerError,
    VerifyReport,
    digest,
    weights_from_bytes,
    weights_to_bytes,
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.zeros(2), "steps": torch.tensor([seed])}


def _score(state: dict[str, torch.Tensor]) -> float:
    """The shared evaluation every validator can rerun: here simply a function of the weights."""
    return float(state["w"].sum())


def _append(ledger: Ledger, round: int) -> Block:
    state = _state(round)
    return ledger.append(round, winner=1, scores=[_score(state) - 1.0, _score(state), None], weights=state, rescore=_score)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "sub" / "ledger.db"  # the parent directory does not exist yet
    with Ledger(path) as ledger:
        for r in range(4):
            _append(ledger, r)
    return path


def _sql(path: Path, statement: str, *params: object) -> None:
    con = sqlite3.connect(path)
    with con:
        con.execute(statement, params)
    con.close()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------- building
def test_blocks_are_linked_and_verify(path: Path) -> None:
    with Ledger(path) as ledger:
        blocks = list(ledger)
        assert [b.index for b in blocks] == [0, 1, 2, 3] == [b.round for b in blocks] and len(ledger) == 4
        assert blocks[0].prev_hash == GENESIS_HASH
        assert all(b.prev_hash == a.hash for a, b in zip(blocks, blocks[1:]))
        assert all(b.hash == b.compute_hash() for b in blocks)
        assert ledger.head_hash == ledger.last.hash == blocks[-1].hash
        assert ledger.block(-1) == blocks[-1] and ledger.block(2) == blocks[2]
        assert blocks[2].scores[2] is None and blocks[2].winner_score == _score(_state(2))
        report = ledger.verify(rescore=_score)
        assert report and report == VerifyReport(True, 4, None, "") and str(report) == "OK: 4 blocks verified"
        with pytest.raises(IndexError, match=r"block index 4 out of range.*4 blocks.*0\.\.3"):
            ledger.block(4)


def test_empty_ledger(tmp_path: Path) -> None:
    with Ledger(tmp_path / "empty.db") as ledger:
        assert len(ledger) == 0 and ledger.last is None and ledger.head_hash == GENESIS_HASH
        assert str(ledger.verify()) == "OK: 0 blocks verified"


def test_integer_time_round_trips(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        block = ledger.append(0, winner=0, scores=[1], weights=_state(0), time=1_700_000_000)
        assert block.time == 1.7e9 and ledger.block(0) == block and ledger.verify()


def test_reopen_continues_the_chain(path: Path) -> None:
    with Ledger(path) as ledger:
        head = ledger.head_hash
        block = _append(ledger, 4)
    assert block.index == 4 and block.prev_hash == head
    with Ledger(path) as ledger:
        assert len(ledger) == 5 and ledger.head_hash == block.hash
        assert ledger.verify(rescore=_score)


def test_load_returns_the_stored_tensors(path: Path) -> None:
    with Ledger(path) as ledger:
        for index in range(4):
            loaded, expected = ledger.load(index), _state(index)
            assert loaded.keys() == expected.keys()
            for name in expected:
                assert loaded[name].dtype == expected[name].dtype
                torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=0)


def test_weights_bytes_are_deterministic_and_checked() -> None:
    state = _state(0)
    data = weights_to_bytes(state)
    assert data == weights_to_bytes({k: v.clone() for k, v in state.items()}) and len(digest(data)) == 64
    assert torch.equal(weights_from_bytes(data)["w"], state["w"])
    with pytest.raises(LedgerError, match="not readable safetensors"):
        weights_from_bytes(data[:-5])


# ----------------------------------------------------------------- tampering
def _change_score(path: Path) -> None:
    _sql(path, "UPDATE blocks SET scores=? WHERE idx=2", "[0.0, 99.0, null]")


def _change_weights(path: Path) -> None:
    _sql(path, "UPDATE blocks SET weights=? WHERE idx=1", weights_to_bytes(_state(99)))


def _remove_block(path: Path) -> None:
    _sql(path, "DELETE FROM blocks WHERE idx=1")


def _swap_blocks(path: Path) -> None:
    con = sqlite3.connect(path)
    cols = "prev_hash, round, winner, scores, digest, time, hash, weights"
    one, two = (con.execute(f"SELECT {cols} FROM blocks WHERE idx=?", (i,)).fetchone() for i in (1, 2))
    with con:
        for idx, row in ((1, two), (2, one)):
            con.execute(f"UPDATE blocks SET ({cols}) = (?, ?, ?, ?, ?, ?, ?, ?) WHERE idx=?", (*row, idx))
    con.close()


def _rehash_block(path: Path) -> None:
    """A careful forger recomputes the changed block's hash: the next block's link breaks instead."""
    with Ledger(path) as ledger:
        fields = {k: v for k, v in dataclasses.asdict(ledger.block(1)).items() if k != "hash"}
    forged = Block.create(**{**fields, "scores": [0.0, 99.0, None]})
    _sql(path, "UPDATE blocks SET scores=?, hash=? WHERE idx=1", "[0.0, 99.0, null]", forged.hash)


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        (_change_score, 2, "hash does not match the block's contents"),
        (_change_weights, 1, "weights do not match their digest"),
        (_remove_block, 1, r"missing \(the next stored block has index 2\)"),
        (_swap_blocks, 1, "prev_hash .* does not link to the previous block's hash"),
        (_rehash_block, 2, "prev_hash .* does not link"),
    ],
)
def test_verify_finds_the_first_tampered_block(path: Path, tamper, first_bad: int, reason: str) -> None:
    tamper(path)
    with Ledger(path) as ledger:
        report = ledger.verify()
    assert not report and report.first_bad == first_bad and report.blocks == first_bad
    assert re.search(reason, report.reason), report.reason
    assert str(report).startswith(f"block {first_bad}: ")


def test_verify_rescore_catches_a_false_claim(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.append(0, winner=0, scores=[0.9], weights=_state(0))  # no validator re-scored it
        report = ledger.verify(rescore=_score)
    assert not report and report.first_bad == 0 and "re-score" in report.reason


def test_load_refuses_tampered_weights(path: Path) -> None:
    _change_weights(path)
    with Ledger(path) as ledger, pytest.raises(LedgerError, match="block 1: weights do not match their digest"):
        ledger.load(1)


# ----------------------------------------------------------------- forged proposals
def _forge(ledger: Ledger, kind: str) -> tuple[Block, bytes]:
    block, data = ledger.propose(4, winner=1, scores=[0.0, _score(_state(4)), None], weights=_state(4))
    fields = {k: v for k, v in dataclasses.asdict(block).items() if k != "hash"}
    if kind == "prev_hash":
        return Block.create(**{**fields, "prev_hash": "f" * 64}), data
    if kind == "digest":
        return block, weights_to_bytes(_state(5))
    if kind == "index":
        return Block.create(**{**fields, "index": 7}), data
    if kind == "nan":
        return dataclasses.replace(block, scores=[math.nan, *block.scores[1:]]), data
    if kind == "winner":
        return Block.create(**{**fields, "winner": 2}), data  # scores[2] is None
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("prev_hash", "block 4: prev_hash fffffffffff.* does not link"),
        ("digest", "block 4: weights do not match their digest"),
        ("index", "block 7: index is 7, the next block must be 4"),
        ("nan", "block 4: scores must be finite numbers or None, got nan at position 0"),
        ("winner", "block 4: winner 2 has no score"),
    ],
)
def test_forged_block_is_refused_and_changes_nothing(path: Path, kind: str, message: str) -> None:
    before = _file_digest(path)
    with Ledger(path) as ledger:
        block, data = _forge(ledger, kind)
        with pytest.raises(BlockRefused, match=message):
            ledger.validate(block, data)
        with pytest.raises(BlockRefused, match=message):
            ledger.commit(block, data)
        assert len(ledger) == 4 and ledger.verify()
    assert _file_digest(path) == before


def test_inflated_score_is_refused_by_rescoring(path: Path) -> None:
    before = _file_digest(path)
    honest = _score(_state(4))
    with Ledger(path) as ledger:
        block, data = ledger.propose(4, winner=0, scores=[honest + 0.5, honest], weights=_state(4))
        with pytest.raises(BlockRefused, match=r"block 4: claimed winner score .* re-score"):
            ledger.validate(block, data, rescore=_score)
        with pytest.raises(BlockRefused, match=r"block 4: claimed winner score .* re-score"):
            ledger.commit(block, data, rescore=_score)
        with pytest.raises(BlockRefused, match="re-score"):
            ledger.append(4, winner=0, scores=[honest + 0.5, honest], weights=_state(4), rescore=_score)
        assert len(ledger) == 4
    assert _file_digest(path) == before


def test_nan_score_cannot_be_proposed(path: Path) -> None:
    with Ledger(path) as ledger, pytest.raises(LedgerError, match="block 4: scores must be finite"):
        ledger.propose(4, winner=0, scores=[float("nan")], weights=_state(4))


def test_a_read_only_ledger_refuses_to_store_not_to_validate(path: Path) -> None:
    """Storing into a read-only ledger is a LedgerError, not a BlockRefused: PoFL raises the one and logs the other."""
    before = _file_digest(path)
    with Ledger(path) as writer:
        block, data = writer.propose(4, winner=0, scores=[_score(_state(4))], weights=_state(4))
    with Ledger(path, readonly=True) as reader:
        reader.validate(block, data, rescore=_score)  # a valid block...
        with pytest.raises(LedgerError, match=f"block 4: {path} is open read-only") as caught:
            reader.commit(block, data, rescore=_score)  # ...that cannot be stored
        assert not isinstance(caught.value, BlockRefused)
        assert len(reader) == 4
    assert _file_digest(path) == before


# ----------------------------------------------------------------- files
def test_a_non_ledger_file_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database, just some text that is long enough to fill a header\n" * 3)
    with pytest.raises(LedgerError, match=f"{text}.*not a ledger database"):
        Ledger(text)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t(x)")
    con.close()
    with pytest.raises(LedgerError, match=rf"{other} is not a ledger database \(an SQLite database with tables \['t'\]\)"):
        Ledger(other)
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


# ----------------------------------------------------------------- command line
def test_cli_verify_and_show(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ledger_cli.main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "OK: 4 blocks verified"

    assert ledger_cli.main(["show", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].split()[:3] == ["index", "round", "winner"]
    with Ledger(path) as ledger:
        for line, block in zip(lines[1:], ledger):
            cells = line.split()
            assert cells[0] == str(block.index) and block.digest[:12] in cells and block.hash[:12] in cells
            assert cells[-1].endswith("+00:00")

    _change_score(path)
    assert ledger_cli.main(["verify", str(path)]) == 1
    assert capsys.readouterr().out.strip() == "block 2: hash does not match the block's contents"


def test_cli_unusable_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.db"
    for command in ("verify", "show"):
        assert ledger_cli.main([command, str(missing)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("colearn-ledger: error: ") and str(missing) in err and err.count("\n") == 1
    assert not missing.exists()  # auditing never creates a file
    text = tmp_path / "notes.txt"
    text.write_text("hello " * 50)
    assert ledger_cli.main(["verify", str(text)]) == 2
    assert "not a ledger database" in capsys.readouterr().err


def test_installed_script(path: Path) -> None:
    script = Path(sys.executable).parent / "colearn-ledger"
    assert script.exists(), f"{script} is missing: run `pip install -e .`"
    done = subprocess.run([str(script), "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "OK: 4 blocks verified", done.stderr


# ----------------------------------------------------------------- broken chains are not extended
def test_a_tampered_chain_is_not_extended(path: Path) -> None:
    _change_score(path)  # block 2
    before = _file_digest(path)
    with Ledger(path) as ledger:
        with pytest.raises(LedgerError, match=r"fails verification \(block 2: hash does not match.*not extended"):
            _append(ledger, 4)
        assert len(ledger) == 4
    assert _file_digest(path) == before


def test_a_chain_checked_once_per_connection_still_sees_a_foreign_change(path: Path) -> None:
    with Ledger(path) as ledger:
        _append(ledger, 4)  # checks the chain once...
        _append(ledger, 5)  # ...then extends what it checked
        _sql(path, "UPDATE blocks SET winner = 0 WHERE idx = 5")  # another writer changes the head
        with pytest.raises(LedgerError, match=r"block 5: hash does not match"):
            _append(ledger, 6)
        assert len(ledger) == 6


def _truncated(path: Path, tmp_path: Path) -> Path:
    """A copy of ``path`` cut inside its last page, as a crash of the file system (not of SQLite) leaves it."""
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")  # the page size, from the SQLite header
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[: len(data) - page + 200])
    return cut


def test_a_truncated_file_is_reported_as_damaged_and_not_extended(path: Path, tmp_path: Path, capsys) -> None:
    cut = _truncated(path, tmp_path)
    before = _file_digest(cut)
    with Ledger(cut, readonly=True) as ledger:
        report = ledger.verify()
    assert not report and report.first_bad is None and report.blocks == 0
    assert str(report).startswith("the database file is damaged (SQLite quick_check: ")
    assert "\n" not in str(report)
    assert ledger_cli.main(["verify", str(cut)]) == 1
    assert "damaged" in capsys.readouterr().out
    with Ledger(cut) as ledger, pytest.raises(LedgerError, match="damaged.*not extended"):
        _append(ledger, 4)
    assert _file_digest(cut) == before


def test_reading_a_truncated_file_blames_the_file_not_a_block(path: Path, tmp_path: Path) -> None:
    cut = _truncated(path, tmp_path)
    before = _file_digest(cut)
    with Ledger(cut, readonly=True) as ledger:
        # before: "block 0: scores are not valid JSON: None" (the cut page's rows read as garbage)
        for read in (lambda: ledger.load(0), lambda: ledger.load(-1), lambda: ledger.block(0), lambda: ledger.last):
            with pytest.raises(LedgerError, match=r"cut\.db: the database file is damaged \(SQLite quick_check: "):
                read()
    assert _file_digest(cut) == before


def test_non_finite_weights_are_refused(path: Path) -> None:
    before = _file_digest(path)
    nan = {**_state(4), "w": torch.full((3, 2), float("nan"))}
    with Ledger(path) as ledger:
        with pytest.raises(LedgerError, match=r"weights 'w' hold NaN or inf values"):
            ledger.append(4, winner=0, scores=[0.5], weights=nan)
        # a forged block whose bytes and digest agree but hold inf: the validators refuse it
        data = weights_to_bytes(_state(4))
        forged = weights_from_bytes(data)
        forged["b"][0] = float("inf")
        from safetensors.torch import save

        bad = save(forged)
        block, _ = ledger.propose(4, winner=0, scores=[0.5], weights=_state(4))
        block = Block.create(**{**{k: getattr(block, k) for k in ("index", "prev_hash", "round", "winner", "scores", "time")},
                                "digest": digest(bad)})
        with pytest.raises(BlockRefused, match=r"block 4: weights 'b' hold NaN or inf values"):
            ledger.commit(block, bad)
        assert len(ledger) == 4
    assert _file_digest(path) == before


def test_a_crafted_scores_cell_is_a_verify_failure_not_a_crash(path: Path, capsys) -> None:
    _sql(path, "UPDATE blocks SET scores = ? WHERE idx = 1", "[" * 100_000)
    with Ledger(path, readonly=True) as ledger:
        report = ledger.verify()
        assert not report and report.first_bad == 1 and report.reason.startswith("scores are not valid JSON: '[[[[")
        assert "(100002 characters)" in report.reason  # shortened, not 100,000 brackets
    assert ledger_cli.main(["verify", str(path)]) == 1
    assert capsys.readouterr().out.startswith("block 1: scores are not valid JSON")
    # show still lists every row; the bad one has no winner score
    assert ledger_cli.main(["show", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2", "3"]
    assert lines[2].split()[3] == "-" and lines[1].split()[3] != "-"


def test_bad_arguments_name_what_is_wrong(path: Path, tmp_path: Path, capsys) -> None:
    with Ledger(path) as ledger:
        for index in (1.0, True, "1", None):
            with pytest.raises(TypeError, match=rf"block index must be an int, got {re.escape(repr(index))}"):
                ledger.load(index)
        with pytest.raises(BlockRefused, match="expected a Block \\(from Ledger.propose\\), got str"):
            ledger.commit("x", b"")
        with pytest.raises(LedgerError, match=r"block 4: scores must be a list of numbers or None .*got None"):
            ledger.append(4, winner=0, scores=None, weights=_state(4))
    with pytest.raises(LedgerError, match=rf"{re.escape(str(tmp_path))} is a directory"):
        Ledger(tmp_path, readonly=True)
    assert ledger_cli.main(["verify", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
