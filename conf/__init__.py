"""Hydra configs, shipped with the package (see pyproject.toml)."""
