"""Saved cohorts (Cohort.save / Cohort.load): safetensors only, and every broken or hostile file is refused
before any member changes."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import BNNet, same_state
from lightning_colearn import Cohort


def states_of(cohort):
    return [cohort.member_state(i) for i in range(len(cohort))]


@pytest.fixture
def saved(tmp_path):
    """A saved 3-member cohort with BatchNorm buffers, its path and digest, and a different cohort to load into."""
    torch.manual_seed(0)
    source = Cohort(BNNet, size=3)
    path = tmp_path / "cohort.safetensors"
    sha = source.save(path)
    torch.manual_seed(1)
    target = Cohort(BNNet, size=3)
    return source, path, sha, target


@pytest.mark.parametrize("backend", ["loop", "stacked"])
def test_round_trip_on_both_backends(saved, backend):
    """Saved weights and buffers load bit-for-bit, into a loop or a stacked cohort, with the digest checked."""
    source, path, sha, _ = saved
    target = Cohort(BNNet, size=3, backend=backend)
    target.load(path, sha256=sha)
    assert all(same_state(a, b) for a, b in zip(states_of(source), states_of(target)))
    assert (path.parent / "cohort.safetensors.sha256").read_text().strip() == sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def rewrite(path, change):
    """Rewrite the file's tensors through ``change(tensors)`` (a tamperer who also fixes the sidecar digest)."""
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "lightning_colearn.cohort/1", "members": "3"})
    (path.parent / (path.name + ".sha256")).write_text(hashlib.sha256(path.read_bytes()).hexdigest())


CASES = {
    "wrong shape": (lambda t: t.__setitem__("1.fc.weight", torch.zeros(3, 3)), r"member 1 does not fit at 'fc.weight': got \(3, 3\)"),
    "wrong dtype": (lambda t: t.__setitem__("2.out.bias", t["2.out.bias"].double()), r"member 2 does not fit at 'out.bias'.*float64"),
    "NaN": (lambda t: t["0.out.weight"].__setitem__((0, 0), float("nan")), r"member 0 has NaN/Inf values in 'out.weight'"),
    "Inf": (lambda t: t["2.bn.running_var"].__setitem__(0, float("inf")), r"member 2 has NaN/Inf values in 'bn.running_var'"),
    "missing tensor": (lambda t: t.pop("1.bn.running_mean"), r"member 1 does not match its tensors: missing \['bn.running_mean'\]"),
    "extra tensor": (lambda t: t.__setitem__("0.extra", torch.zeros(1)), r"member 0 does not match its tensors: missing \[\], unexpected \['extra'\]"),
    "foreign member": (lambda t: t.__setitem__("7.fc.bias", torch.zeros(16)), r"'7.fc.bias', which belongs to no member"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_contents_are_refused_and_change_nothing(saved, case):
    """Each kind of bad tensor is refused with the member and tensor named; no member of the target changes."""
    _, path, _, target = saved
    change, message = CASES[case]
    rewrite(path, change)
    before = states_of(target)
    with pytest.raises(ValueError, match=message):
        target.load(path)
    assert all(same_state(a, b) for a, b in zip(before, states_of(target)))


def test_truncated_file_is_refused(saved):
    """A truncated file (its digest no longer matches, and without a digest it does not parse) changes nothing."""
    _, path, sha, target = saved
    path.write_bytes(path.read_bytes()[:-100])
    before = states_of(target)
    with pytest.raises(ValueError, match=r"have SHA-256 .* but the sidecar file says"):
        target.load(path)
    (path.parent / (path.name + ".sha256")).unlink()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        target.load(path)
    assert all(same_state(a, b) for a, b in zip(before, states_of(target)))


def test_bad_digest_is_refused(saved):
    """A file changed by someone who could not fix the digest the caller kept is refused."""
    _, path, sha, target = saved
    rewrite(path, lambda t: t["0.fc.bias"].add_(1.0))  # the sidecar is rewritten too, the caller's digest is not
    with pytest.raises(ValueError, match=rf"but the argument says {sha}"):
        target.load(path, sha256=sha)


def test_pickle_is_never_loaded(tmp_path):
    """A pickle (what torch.save writes) is refused as unreadable, never unpickled."""
    path = tmp_path / "evil.safetensors"

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Cohort(BNNet, size=3).load(path)


def test_wrong_member_count_and_format(saved, tmp_path):
    """A file of another cohort size, or not written by Cohort.save, is refused naming both."""
    source, path, _, _ = saved
    with pytest.raises(ValueError, match="with 3 members; this cohort needs format .* with 2 members"):
        Cohort(BNNet, size=2).load(path)
    other = tmp_path / "plain.safetensors"
    save_file({"fc.weight": torch.zeros(16, 784)}, str(other))
    with pytest.raises(ValueError, match="hold format None"):
        Cohort(BNNet, size=3).load(other)
