"""The lab's own input files, shipped inside the package so that a plain
``pip install .`` (not only an editable checkout) finds them:

- ``kernel/catalog.toml``: the named kernels (lab.kernels.catalog);
- ``kernel/devdax-lab.config``: the config fragment for built kernels (lab.build);
- ``vm-images/``: the guest image recipe, /init and the agent's C source (lab.image).

Every lookup of these files goes through :func:`data_path`."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "data_path"]

DATA_DIR = Path(__file__).resolve().parent


def data_path(*parts: str) -> Path:
    """``lab/data/PARTS...`` of the installed package, e.g.
    ``data_path("kernel", "catalog.toml")``."""
    return DATA_DIR.joinpath(*parts)
