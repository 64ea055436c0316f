"""MkDocs hooks: pages generated from the code and the configs at build time, so they cannot drift from them.

* ``reference/config.md``: every Hydra config group under ``conf/`` with each option's fields, defaults and
  the comments written beside them in the YAML;
* ``reference/api.md``: the public names (``lightning_colearn.__all__`` and the public modules' ``__all__``),
  each rendered by mkdocstrings from its docstring.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

#: Public modules whose ``__all__`` the API page lists after the package's own names (module, heading).
MODULES = [
    ("lightning_colearn.callbacks", "Callbacks"),
    ("lightning_colearn.data", "Data"),
    ("lightning_colearn.models", "Models"),
    ("lightning_colearn.metrics", "Metrics"),
    ("lightning_colearn.trackers", "Trackers"),
    ("lightning_colearn.plots", "Plots"),
    ("lightning_colearn.functional", "Functional (pure tensor functions)"),
    ("lightning_colearn.cli", "Command line"),
]

_LINE = re.compile(r"^(?P<indent>\s*)(?P<dash>-\s+)?(?P<key>[A-Za-z_][\w.@/]*)\s*:\s*(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def config_fields(path: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """A config file's leading comment and its ``(dotted key, default, comment)`` rows, in file order."""
    header, rows, stack = [], [], []  # stack: (indent, key) of the mappings we are inside
    lines = path.read_text().splitlines()
    for line in lines:
        if line.startswith("#") and not rows:
            text = line.lstrip("#").strip()
            if not text.startswith("@package"):
                header.append(text)
            continue
        match = _LINE.match(line)
        if not match or match["dash"]:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        value = match["value"].strip()
        if key == "defaults" or key.startswith("defaults."):
            continue
        if value == "":  # a mapping (or a list below): its keys follow, deeper
            stack.append((indent, match["key"]))
            if match["comment"]:
                rows.append((key, "", match["comment"].strip()))
            continue
        rows.append((key, value, (match["comment"] or "").strip()))
    return " ".join(header), rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_page() -> str:
    out = ["# Configuration", "",
           "Every Hydra config group under `conf/` (shipped inside the package), each option with its fields, their "
           "defaults and the comments beside them. Pick an option with `colearn <group>=<option>`, set a field with "
           "`colearn <group>.<field>=<value>`. This page is generated from the YAML files when the site is built.", ""]
    title, rows = config_fields(CONF / "config.yaml")
    out += ["## The primary config (`config.yaml`)", "", title, "", "| field | default | note |", "| --- | --- | --- |"]
    out += [f"| `{k}` | `{_cell(v)}` | {_cell(c)} |" if v else f"| `{k}` | | {_cell(c)} |" for k, v, c in rows]
    groups = sorted({p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF})
    for group in groups:
        out += ["", f"## Group `{group}`", ""]
        for path in sorted((CONF / group).glob("*.yaml")):
            title, rows = config_fields(path)
            out += [f"### `{group}={path.stem}`", ""]
            if title:
                out += [title, ""]
            if rows:
                out += ["| field | default | note |", "| --- | --- | --- |"]
                out += [f"| `{k}` | `{_cell(v)}` | {_cell(c)} |" if v else f"| `{k}` | | {_cell(c)} |" for k, v, c in rows]
            else:
                out += ["(no fields)"]
            out.append("")
    return "\n".join(out) + "\n"


def config_groups() -> list[str]:
    """``group=option`` for every config file (what the site must list)."""
    return sorted(f"{p.parent.relative_to(CONF).as_posix()}={p.stem}" for p in CONF.rglob("*.yaml") if p.parent != CONF)


def public_names() -> dict[str, list[tuple[str, str]]]:
    """``{heading: [(name, import path)]}``: the package's ``__all__``, then each public module's."""
    package = importlib.import_module("lightning_colearn")
    names = {"Package (`import lightning_colearn`)": [(n, f"{package._EXPORTS[n]}.{n}") for n in package.__all__]}
    for module_name, heading in MODULES:
        module = importlib.import_module(module_name)
        names[f"{heading} (`{module_name}`)"] = [(n, f"{module_name}.{n}") for n in module.__all__]
    return names


def api_page() -> str:
    out = ["# API reference", "",
           "The public names, rendered from their docstrings (whose examples run as doctests in `make test`). "
           "This page is generated when the site is built.", ""]
    for heading, names in public_names().items():
        out += [f"## {heading}", ""]
        for name, path in names:
            out += [f"::: {path}", "    options:", "      heading_level: 3", ""]
    return "\n".join(out) + "\n"


def on_files(files, config):
    for uri, content in (("reference/config.md", config_page()), ("reference/api.md", api_page())):
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))
    return files
