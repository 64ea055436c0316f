"""The benchmark scripts still run: every one imports, and the two that measure open targets run a tiny case.

The scripts live outside the package (``bench/``, run as ``python bench/<name>.py``) and
import each other through ``bench/common.py``, so nothing else would notice an import or
API change that breaks them. They run in subprocesses, as a user runs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "common")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=BENCH, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_bench_script_imports_and_has_a_main():
    code = "import importlib\n" + "".join(
        f"assert callable(importlib.import_module({name!r}).main), {name!r}\n" for name in SCRIPTS
    )
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"federated", "vectorised", "cohort_throughput"} <= set(SCRIPTS)


@pytest.mark.slow
def test_federated_bench_prints_the_pofl_share_and_its_floors():
    result = _run(["federated.py", "--rounds", "2", "--datasets", "mnist_small"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0 |")]
    assert [row.split(" | ")[1] for row in rows] == ["FedAvg", "FedAvg", "PoFL"]
    floors = re.search(r"target < 20 %; forward floor ([\d.]+) %, append floor ([\d.]+) %", rows[-1])
    assert floors and 0 < float(floors[1]) <= float(floors[2]) < 100, rows[-1]
    assert "GPU available" not in result.stdout + result.stderr  # Lightning's notices stay out of the output


@pytest.mark.slow
def test_vectorised_bench_prints_its_ratios():
    result = _run(["vectorised.py", "--models", "lr", "--sizes", "2", "--repeats", "1", "--steps", "2", "--warmup", "1",
                   "--no-memory", "--no-floor"])
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("lr ") and line.split()[1] == "2")
    ratios = [float(v) for v in row.split()[-3:]]  # loop/plain, stacked/plain, stacked/loop
    assert all(r > 0 for r in ratios)


def test_partition_bench_prints_every_scheme():
    result = _run(["partition.py", "--quick", "--no-flwr", "--repeats", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    from lightning_colearn.data.partition import PARTITIONS

    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| scheme")
            and not line.startswith("| ---")]
    assert [row[0].lstrip("| ") for row in rows] == list(PARTITIONS)
    assert all(float(row[1]) > 0 for row in rows)


@pytest.mark.slow
def test_data_path_bench_prints_its_ratios():
    result = _run(["data_path.py", "--steps", "3", "--repeats", "1", "--models", "MLP"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row.split(" | ")[1]: row for row in result.stdout.splitlines() if row.startswith("| MLP |")}
    assert list(rows) == ["tensor path", "generic Dataset", "generic + __getitems__", "generic, in_memory", "plain PyTorch loop"]
    assert re.search(r"MLP: generic / tensor [\d.]+x \((PASS|FAIL)", result.stdout)
    assert "GPU available" not in result.stdout + result.stderr


@pytest.mark.slow
def test_strategy_table_prints_a_row_per_strategy():
    result = _run(["federated.py", "--strategies", "FedAvg", "FedAdam", "SCAFFOLD", "--rounds", "1", "--seeds", "0",
                   "--models", "MLP", "--datasets", "mnist_small"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| MLP |")]
    assert [(row[1], row[2]) for row in rows] == [(p, s) for p in ("Dirichlet 0.1", "2-label shards")
                                                  for s in ("FedAvg", "FedAdam", "SCAFFOLD")]
    assert all(0 <= float(row[5].split()[0]) <= 1 for row in rows)


@pytest.mark.slow
def test_privacy_bench_prints_speed_and_accuracy_tables():
    result = _run(["privacy.py", "--quick"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    speed = next(line.split(" | ") for line in out.splitlines() if line.startswith("| MLP | 2 |"))
    plain, private, ratio = (float(v.replace(",", "")) for v in speed[2:5])
    assert plain > 0 and private > 0 and ratio == pytest.approx(private / plain, abs=0.01)
    assert "use backend='loop'" in out  # the stacked backend's refusal is printed, not hidden
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| 1 | 0 |", "| inf | 0 |"))]
    assert [row[0].lstrip("| ") for row in rows] == ["1", "inf", "1", "inf"]  # voting, then DP-FedAvg
    for row in rows:
        if row[0].endswith("1"):
            assert 0 < float(row[3]) <= 1.0  # the epsilon reached stays within the target
        assert 0 <= float(row[-2]) <= 1  # test accuracy


@pytest.mark.slow
def test_pbt_bench_prints_pbt_and_fixed_rows():
    result = _run(["pbt.py", "--quick", "--no-ray"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in result.stdout.splitlines()
            if row.startswith(("| PBT", "| fixed"))}
    assert list(rows) == ["PBT (ours)", "fixed (same samples)"]
    for row in rows.values():
        best, mean = float(row[1]), float(row[2])
        assert 0 <= best <= 1 and 0 <= mean <= 1 and float(row[3]) > 0
    assert re.search(r"^(PASS|FAIL): PBT's best member", result.stdout, re.MULTILINE)
    assert "GPU available" not in result.stdout + result.stderr
