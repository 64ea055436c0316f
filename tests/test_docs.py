"""The documentation site: it builds with warnings as errors, and lists every public name and every config option.

The strict build (``mkdocs build --strict``) fails on a broken link or anchor, a
cross-reference that does not resolve, or a docstring whose ``Args`` name a
parameter the signature lacks. The API page is generated from ``__all__`` and
the configuration page from ``conf/`` (``docs/hooks.py``), so a new public name
or config file appears without anyone editing the docs; these tests check that
it did.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import hooks  # noqa: E402  (docs/hooks.py: what the site generates)

MKDOCS = Path(sys.executable).with_name("mkdocs")


def _public_objects():
    for heading, names in hooks.public_names().items():
        for name, path in names:
            module, _, attr = path.rpartition(".")
            yield path, getattr(importlib.import_module(module), attr)


def test_every_public_name_has_a_docstring():
    missing = [path for path, obj in _public_objects()
               if not (inspect.getdoc(obj) or "").strip() and not isinstance(obj, (int, float, str, tuple, dict, frozenset))]
    assert missing == []


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.slow
def test_the_site_lists_every_public_name(site):
    page = (site / "reference" / "api" / "index.html").read_text()
    absent = [path for path, _ in _public_objects() if f'id="{path}"' not in page]
    assert absent == []


@pytest.mark.slow
def test_the_site_lists_every_config_option_with_its_fields(site):
    page = (site / "reference" / "config" / "index.html").read_text()
    absent = [option for option in hooks.config_groups() if f"<code>{option}</code>" not in page]
    assert absent == []
    assert "<code>checkpoint_every_n_steps</code>" in page and "<code>tracking.run_name</code>" in page  # primary fields
    assert "<code>callbacks.voting.threshold</code>" in page  # a nested field of an option


@pytest.mark.slow
def test_the_site_has_every_guide_and_tutorial(site):
    for page in ("index.html", "benchmarks/index.html", "guides/trackers/index.html", "guides/reliability/index.html",
                 "tutorials/01_quickstart/index.html", "tutorials/08_population_based_training/index.html"):
        assert (site / page).is_file(), page
