"""plot_label_distribution: a readable PNG from 2 to 1,000 members, and every bad input named."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_colearn.plots import plot_label_distribution

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    """The image as an array, after checking the file is a PNG matplotlib can read back."""
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    return image


def _dirichlet_counts(members: int, classes: int, per_member: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Counts of a label-skewed partition: each member's class shares drawn from Dirichlet(alpha)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.multinomial(per_member, p) for p in rng.dirichlet([alpha] * classes, size=members)])


@pytest.mark.parametrize("as_type", [list, np.asarray, torch.tensor])
def test_small_counts_give_a_png(tmp_path, as_type):
    counts = as_type([[30, 0, 5, 12], [2, 40, 1, 0], [10, 10, 10, 10]])
    out = tmp_path / "nested" / "dir" / "labels.png"  # parent directories are created
    got = plot_label_distribution(counts, out, class_names=["cat", "dog", "bird", "fish"], title="three members")
    assert got == out
    image = _read_png(out)
    assert image.shape[1] > image.shape[0]  # two panels side by side


def test_large_counts_give_a_png(tmp_path):
    counts = torch.from_numpy(_dirichlet_counts(200, 100, 500))
    out = plot_label_distribution(counts, tmp_path / "large.png")
    height, width, _ = _read_png(out).shape
    assert height <= 12 * 110 and width <= 18 * 110  # the figure stays a screen's size, whatever the counts


@pytest.mark.parametrize("members, classes, kwargs", [
    (2, 2, {}),
    (1, 1, {}),  # one member, one class
    (20, 20, {}),  # the largest annotated heat-map and the largest legend
    (50, 15, {"member_names": [f"client-{i}" for i in range(50)]}),  # the most members named on the axis
    (30, 40, {"class_names": [f"c{i}" for i in range(40)]}),  # classes on a colour bar, named on the heat-map
    (1000, 10, {}),
])
def test_from_two_to_a_thousand_members(tmp_path, members, classes, kwargs):
    import matplotlib.pyplot as plt

    counts = _dirichlet_counts(members, classes, 60, seed=members)
    _read_png(plot_label_distribution(counts, tmp_path / "labels.png", **kwargs))
    assert plt.get_fignums() == []  # the figure was closed


def test_empty_members_and_whole_number_floats(tmp_path):
    counts = np.array([[0.0, 0.0], [3.0, 4.0]])  # a member without samples; counts as floats (e.g. a bincount().float())
    _read_png(plot_label_distribution(counts, tmp_path / "a.png"))
    _read_png(plot_label_distribution(torch.zeros(2, 3, dtype=torch.bfloat16), tmp_path / "b.png"))  # all zero


BAD = [
    ([1, 2, 3], {}, r"counts must be 2-D \[members, classes\] with at least one of each, got shape \(3,\)"),
    (np.zeros((2, 3, 4), dtype=int), {}, r"counts must be 2-D .*, got shape \(2, 3, 4\)"),
    (np.zeros((0, 3), dtype=int), {}, r"counts must be 2-D .* at least one of each, got shape \(0, 3\)"),
    (np.zeros((3, 0), dtype=int), {}, r"got shape \(3, 0\)"),
    (5, {}, r"counts must be 2-D .*, got shape \(\)"),
    ([[1, 2], [3]], {}, r"counts must be a rectangular \[members, classes\] array, got a ragged list"),
    ([[1, -2], [3, 4]], {}, r"counts must be >= 0, got -2 \(member 0, class 1\)"),
    (torch.tensor([[1, 2], [3, -4]]), {}, r"counts must be >= 0, got -4 \(member 1, class 1\)"),
    ([[1.0, 2.5]], {}, r"counts must be whole numbers, got 2.5 \(member 0, class 1\)"),
    ([[1.0, float("nan")]], {}, r"counts must be whole numbers, got nan \(member 0, class 1\)"),
    ([["a", "b"]], {}, r"counts must be integers, got dtype <U1"),
    ([[1, 2, 3], [4, 5, 6]], {"class_names": ["a", "b"]},
     r"class_names must be a sequence of 3 names, one per class \(counts has shape \(2, 3\)\), got 2: \['a', 'b'\]"),
    ([[1, 2, 3], [4, 5, 6]], {"class_names": "abc"},
     r"class_names must be a sequence of 3 names, one per class \(counts has shape \(2, 3\)\), got 'abc'"),
    ([[1, 2, 3], [4, 5, 6]], {"member_names": ["x", "y", "z"]},
     r"member_names must be a sequence of 2 names, one per member \(counts has shape \(2, 3\)\), got 3: \['x', 'y', 'z'\]"),
    ([[1, 2, 3], [4, 5, 6]], {"member_names": 7}, r"member_names must be a sequence of 2 names, .*, got 7"),
    ([[1, 2, 3], [4, 5, 6]], {"title": 3}, r"title must be a str or None, got 3"),
]
BAD_IDS = ["1-d", "3-d", "no-members", "no-classes", "scalar", "ragged", "negative", "negative-tensor", "fraction", "nan",
           "strings", "class-names-short", "class-names-str", "member-names-long", "member-names-int", "title"]


@pytest.mark.parametrize("counts, kwargs, message", BAD, ids=BAD_IDS)
def test_bad_input_names_the_argument_and_what_was_seen(tmp_path, counts, kwargs, message):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=message):
        plot_label_distribution(counts, out, **kwargs)
    assert not out.exists()


def test_importing_the_plots_does_not_import_matplotlib():
    code = "import sys, lightning_colearn.plots; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
