"""Benchmark: partitioning a data set over a cohort's members, every scheme, against a 0.5 s target.

Times :func:`lightning_colearn.data.partition.partition` (seconds, median of ``--repeats`` runs) for
every scheme on random labels of 10 classes: 60,000 samples over 100 members, and 1,000,000 samples
over 1,000 members (the target: well under 0.5 s on a 2-core CPU), plus 1,000,000 samples of 100
classes over 1,000 members. Settings: ``dirichlet`` and ``inner_dirichlet`` alpha 0.5, ``shards`` 2
per member, ``pathological`` 2 classes per member, ``sizes`` equal sample counts, ``natural`` 3,000
(60k) or 10,000 (1M) random group ids.

If ``flwr_datasets`` is importable (it is not a dependency of this project), the equivalent
flwr-datasets partitioners run on a Hugging Face ``datasets.Dataset.from_dict`` holding the same labels
(and group ids). Timed: the whole assignment of samples to partitions. Their first ``load_partition``
computes every partition's indices (``_determine_partition_id_to_indices_if_needed`` /
``_create_partition_id_to_indices``), then selects one partition, so the time of
``load_partition(0)`` on a fresh partitioner is what is timed; ``IidPartitioner`` computes nothing up
front (each ``load_partition(i)`` is a contiguous, unshuffled ``Dataset.shard``), so there the time to
load all partitions is timed. ``ShardPartitioner`` expects a label-sorted data set and gets one (the sort
is not timed; ours sorts inside). ``NaturalIdPartitioner`` makes one partition per group (3,000 / 10,000),
not one per member. Each flwr-datasets run is a single run in a forked process, stopped after
``--flwr-timeout`` seconds (their ``InnerDirichletPartitioner`` deals one sample at a time).

Then the training-data path (:mod:`data_path`): member-samples/s of a 12-member cohort fed from a
generic ``Dataset`` against the in-memory tensor path and a plain PyTorch loop.

Run: ``.venv/bin/python bench/partition.py`` (``--quick``: 60k over 100 members only, no data path;
``--no-flwr``; ``--no-data-path``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
import warnings

import numpy as np

from lightning_colearn.data.partition import PARTITIONS, partition

TARGET = 0.5  # seconds, for 1,000,000 labels over 1,000 members
ALPHA, SHARDS_PER_MEMBER, LABELS_PER_MEMBER = 0.5, 2, 2
# name: (samples, members, classes, natural's groups)
CASES = {
    "60k/100": (60_000, 100, 10, 3_000),
    "1M/1,000": (1_000_000, 1_000, 10, 10_000),
    "1M/1,000, 100 classes": (1_000_000, 1_000, 100, 10_000),
}
QUICK_CASES = ("60k/100",)
FLWR_CASES = ("60k/100", "1M/1,000")


def make_data(samples: int, classes: int, groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, samples), rng.integers(0, groups, samples)


def equal_sizes(samples: int, members: int) -> list[int]:
    return [samples // members + (i < samples % members) for i in range(members)]


def scheme_kwargs(scheme: str, samples: int, members: int, groups: np.ndarray) -> dict:
    return {
        "dirichlet": {"alpha": ALPHA},
        "inner_dirichlet": {"alpha": ALPHA},
        "shards": {"shards_per_member": SHARDS_PER_MEMBER},
        "pathological": {"labels_per_member": LABELS_PER_MEMBER},
        "sizes": {"sizes": equal_sizes(samples, members)},
        "natural": {"groups": groups},
    }.get(scheme, {})


def time_ours(scheme: str, labels: np.ndarray, members: int, groups: np.ndarray, repeats: int) -> float:
    kwargs = scheme_kwargs(scheme, len(labels), members, groups)
    seconds = []
    for seed in range(repeats):
        start = time.perf_counter()
        parts = partition(labels, members, scheme, seed=seed, **kwargs)
        seconds.append(time.perf_counter() - start)
        assert len(parts) == members
    return float(np.median(seconds))


# ------------------------------------------------------------------ flwr-datasets (optional)
def flwr_partitioner(scheme: str, samples: int, members: int):
    """The flwr-datasets partitioner equivalent to our ``scheme`` (imported only when flwr_datasets is installed)."""
    from flwr_datasets import partitioner as fp

    return {
        "iid": lambda: fp.IidPartitioner(members),
        "dirichlet": lambda: fp.DirichletPartitioner(members, "label", alpha=ALPHA, min_partition_size=1, seed=0),
        "shards": lambda: fp.ShardPartitioner(members, "label", num_shards_per_partition=SHARDS_PER_MEMBER, seed=0),
        "pathological": lambda: fp.PathologicalPartitioner(members, "label", LABELS_PER_MEMBER, seed=0),
        "linear": lambda: fp.LinearPartitioner(members),
        "square": lambda: fp.SquarePartitioner(members),
        "exponential": lambda: fp.ExponentialPartitioner(members),
        "sizes": lambda: fp.SizePartitioner(equal_sizes(samples, members)),
        "inner_dirichlet": lambda: fp.InnerDirichletPartitioner(equal_sizes(samples, members), "label", alpha=ALPHA,
                                                                seed=0),
        "natural": lambda: fp.NaturalIdPartitioner("group"),
    }[scheme]()


def _flwr_child(conn, scheme: str, dataset, members: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # their progress bars and overflow warnings stay out of the table
    try:
        p = flwr_partitioner(scheme, len(dataset), members)
        p.dataset = dataset
        start = time.perf_counter()
        if scheme == "iid":  # lazy per partition: the whole assignment is every partition's shard
            for i in range(members):
                p.load_partition(i)
        else:  # the first load computes every partition's indices
            p.load_partition(0)
        conn.send(("ok", time.perf_counter() - start))
    except Exception as err:  # noqa: BLE001 - reported in the table
        conn.send(("error", f"{type(err).__name__}: {err}"))


def time_flwr(scheme: str, dataset, members: int, timeout: float) -> tuple[str, float | str]:
    """One run in a forked process (the data set is inherited), stopped after ``timeout`` seconds."""
    parent, child = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(target=_flwr_child, args=(child, scheme, dataset, members))
    proc.start()
    child.close()
    result = ("timeout", timeout)
    if parent.poll(timeout):
        result = parent.recv()
    proc.kill()  # only this child, by its own handle
    proc.join()
    return result


def flwr_datasets_for(labels: np.ndarray, groups: np.ndarray):
    import datasets
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    with warnings.catch_warnings():  # pyarrow's deprecation notices from inside datasets' sort
        warnings.simplefilter("ignore")
        plain = datasets.Dataset.from_dict({"label": labels, "group": groups})
        return plain, plain.sort("label")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 60k labels over 100 members")
    parser.add_argument("--repeats", type=int, default=5, help="runs per scheme and size (median)")
    parser.add_argument("--schemes", nargs="+", default=list(PARTITIONS), choices=PARTITIONS)
    parser.add_argument("--no-flwr", action="store_true", help="do not time flwr-datasets even if installed")
    parser.add_argument("--flwr-timeout", type=float, default=20.0,
                        help="seconds before a flwr-datasets run is stopped")
    parser.add_argument("--no-data-path", action="store_true", help="skip the training-data path table (bench/data_path.py)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    cases = QUICK_CASES if args.quick else tuple(CASES)

    print(f"numpy {np.__version__}, {os.cpu_count()} CPU(s); seconds, median of {args.repeats} runs; "
          f"target for 1M labels over 1,000 members: < {TARGET} s\n")
    ours: dict[tuple[str, str], float] = {}
    data = {case: make_data(CASES[case][0], CASES[case][2], CASES[case][3]) for case in cases}
    for case in cases:
        labels, groups = data[case]
        for scheme in args.schemes:
            ours[scheme, case] = time_ours(scheme, labels, CASES[case][1], groups, args.repeats)
    targeted = [c for c in cases if CASES[c][0] == 1_000_000]
    print("| scheme | " + " | ".join(f"{c} (s)" for c in cases) + " | target < 0.5 s at 1M/1,000 |")
    print("| --- | " + " | ".join("---:" for _ in cases) + " | --- |")
    for scheme in args.schemes:
        verdict = ("PASS" if all(ours[scheme, c] < TARGET for c in targeted) else "FAIL") if targeted else "- (--quick)"
        print(f"| {scheme} | " + " | ".join(f"{ours[scheme, c]:.4f}" for c in cases) + f" | {verdict} |")

    if not args.no_flwr:
        compare_flwr(args, cases, data, ours)
    if not args.no_data_path and not args.quick:
        import data_path  # the training-data path: generic Dataset vs tensors vs a plain loop

        print("\nTraining-data path (bench/data_path.py):\n")
        data_path.measure(["MLP", "ConvNet"], steps=120, repeats=3)


def compare_flwr(args, cases, data, ours) -> None:
    try:
        import flwr_datasets
    except ImportError:
        print("\nflwr-datasets: skipped (flwr_datasets is not installed; `pip install flwr-datasets` to compare)")
        return
    flwr_cases = [c for c in FLWR_CASES if c in cases]
    hf = {case: flwr_datasets_for(*data[case]) for case in flwr_cases}
    print(f"\nflwr-datasets {flwr_datasets.__version__}: the whole assignment, one run each in a forked process "
          f"(stopped after {args.flwr_timeout:.0f} s); ratio = flwr-datasets / ours\n")
    print("| scheme | flwr-datasets partitioner | " + " | ".join(f"{c} (s) | ratio" for c in flwr_cases) + " |")
    print("| --- | --- | " + " | ".join("---: | ---:" for _ in flwr_cases) + " |")
    rows: dict[str, list[str]] = {scheme: [] for scheme in args.schemes}
    errors: list[str] = []
    for case in flwr_cases:
        plain, by_label = hf[case]
        for scheme in args.schemes:
            status, value = time_flwr(scheme, by_label if scheme == "shards" else plain, CASES[case][1],
                                      args.flwr_timeout)
            if status == "ok":
                rows[scheme].append(f"{value:.3f} | {value / ours[scheme, case]:.0f}x")
            elif status == "timeout":
                rows[scheme].append(f"> {value:.0f} (stopped) | > {value / ours[scheme, case]:.0f}x")
            else:
                errors.append(f"{scheme}, {case}: {value}")
                rows[scheme].append(f"error [{len(errors)}] | -")
    names = {"iid": "IidPartitioner (all partitions)", "dirichlet": "DirichletPartitioner",
             "shards": "ShardPartitioner (pre-sorted)", "pathological": "PathologicalPartitioner",
             "linear": "LinearPartitioner", "square": "SquarePartitioner", "exponential": "ExponentialPartitioner",
             "sizes": "SizePartitioner", "inner_dirichlet": "InnerDirichletPartitioner",
             "natural": "NaturalIdPartitioner (a partition per group)"}
    for scheme in args.schemes:
        print(f"| {scheme} | {names[scheme]} | " + " | ".join(rows[scheme]) + " |")
    for i, error in enumerate(errors, 1):
        print(f"[{i}] {error}")


if __name__ == "__main__":
    main()
