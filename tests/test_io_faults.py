"""Runs that meet a second writer, a read-only directory or a full disk: a clear error, nothing already saved lost.

The file systems are real: small ``tmpfs`` mounts (a full one, a read-only one),
which need root; without it the disk-full cases inject ``OSError(ENOSPC)`` at
the write instead. The second writer is a real second process.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import fast_trainer
from lightning_colearn import CohortDataModule, CohortModule, Ledger, LedgerError
from lightning_colearn.callbacks import CheckpointWriteError, EpochCheckpoint
from lightning_colearn.models import MLP

COLEARN = Path(sys.executable).with_name("colearn")


def _mount(path: Path, size_kib: int, readonly: bool = False) -> bool:
    """A tmpfs of ``size_kib`` at ``path``; False where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    made: list[Path] = []

    def mount(path: Path, size_kib: int, readonly: bool = False) -> bool:
        ok = _mount(path, size_kib, readonly)
        if ok:
            made.append(path)
        return ok

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", str(path)], capture_output=True)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}


# ---------------------------------------------------------------------------------------------- ledger
def test_a_second_writer_process_is_refused_naming_the_block_it_lost_to(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        ledger.append(round=0, winner=0, scores=[0.5], weights=_weights(0))
        block, data = ledger.propose(round=1, winner=0, scores=[0.6], weights=_weights(1))  # this writer's next block
        other = textwrap.dedent(f"""
            import torch
            from lightning_colearn import Ledger
            with Ledger({str(path)!r}) as ledger:
                ledger.append(round=7, winner=0, scores=[0.9], weights={{"w": torch.zeros(64, 64)}})
        """)
        subprocess.run([sys.executable, "-c", other], check=True, timeout=120)  # the other writer appends block 1
        with pytest.raises(LedgerError, match=r"block 1: another writer appended block 1 first \(round 7, hash [0-9a-f]{12}\.\.\.\); "
                                              r"this block was not written"):
            ledger.commit(block, data)
    with Ledger(path, readonly=True) as ledger:
        assert ledger.verify() and len(ledger) == 2 and ledger.block(1).round == 7  # the chain is the other's, whole


def test_a_reader_process_sees_a_valid_chain_while_a_writer_appends(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        ledger.append(round=0, winner=0, scores=[0.5], weights=_weights(0))
    writer = textwrap.dedent(f"""
        import torch
        from lightning_colearn import Ledger
        with Ledger({str(path)!r}) as ledger:
            for r in range(1, 41):
                ledger.append(round=r, winner=0, scores=[0.5], weights={{"w": torch.full((64, 64), float(r))}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer])
    try:
        seen = []
        while proc.poll() is None or not seen:
            with Ledger(path, readonly=True) as reader:
                report = reader.verify()
                assert report, report
                seen.append(len(reader))
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    with Ledger(path, readonly=True) as ledger:
        assert ledger.verify() and len(ledger) == 41


def test_a_full_disk_during_a_ledger_append_keeps_the_chain(tmp_path, mounts):
    disk = tmp_path / "disk"
    if not mounts(disk, 256):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    stored = 0
    with Ledger(disk / "ledger.db") as ledger:
        with pytest.raises(LedgerError, match=r"block \d+: could not be stored in .*ledger.db: database or disk is full"):
            for r in range(100):  # 16 KiB of weights a block: the 256 KiB disk fills
                ledger.append(round=r, winner=0, scores=[0.5], weights=_weights(r))
                stored += 1
    assert stored > 0
    with Ledger(disk / "ledger.db", readonly=True) as ledger:
        assert ledger.verify() and len(ledger) == stored  # every block appended before the disk filled, nothing half


# ----------------------------------------------------------------------------------------- checkpoints
def _fit_with_checkpoints(dirpath: Path, epochs: int) -> CohortModule:
    module = CohortModule(lambda: MLP(hidden=16), size=2, num_classes=10)
    trainer = fast_trainer(max_epochs=epochs, callbacks=[EpochCheckpoint(dirpath)], enable_checkpointing=True)
    trainer.fit(module, datamodule=CohortDataModule(num_members=2, batch_size=32, max_train_samples=128, seed=0))
    return module


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, mounts, monkeypatch):
    _fit_with_checkpoints(tmp_path / "probe", 1)
    size = (tmp_path / "probe" / "last.ckpt").stat().st_size
    disk = tmp_path / "disk"
    if not mounts(disk, (size * 3 // 2) // 1024 + 4):  # room for one checkpoint, not for its replacement beside it
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        calls = []
        real = TorchCheckpointIO.save_checkpoint

        def fill_up(self, checkpoint, path, storage_options=None):
            calls.append(path)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(self, checkpoint, path, storage_options)

        monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", fill_up)
        disk.mkdir()
    with pytest.raises(CheckpointWriteError, match=r"checkpoint .*last.ckpt could not be written \(No space left on device\); "
                                                   r"the previous checkpoint there, if any, is intact"):
        _fit_with_checkpoints(disk, 3)
    kept = torch.load(disk / "last.ckpt", weights_only=True)
    assert kept["epoch"] == 0 and kept["state_dict"]  # the first epoch's checkpoint, whole
    assert not list(disk.glob("*.tmp"))  # the half-written replacement is gone


def test_a_read_only_run_dir_is_one_line_before_anything_is_written(tmp_path, mounts):
    ro = tmp_path / "ro"
    if not mounts(ro, 64, readonly=True):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    proc = subprocess.run([str(COLEARN), "trainer=debug", f"hydra.run.dir={ro / 'run'}"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"colearn: error: hydra.run.dir: {ro / 'run'} is not writable (Read-only file system); choose another directory "
        "(hydra.run.dir=... or hydra.sweep.dir=...) or free space there"]


def test_train_refuses_an_output_dir_it_cannot_write(tmp_path, mounts):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lightning_colearn.cli import ConfigError, train

    ro = tmp_path / "ro"
    if not mounts(ro, 64, readonly=True):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_colearn.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.output_dir={ro / 'out'}", "trainer=debug"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError, match=rf"paths.output_dir: {ro / 'out'} is not writable \(Read-only file system\)"):
        train(cfg)
