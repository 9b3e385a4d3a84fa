"""Where the lab's own files are, and what the default devices hold: for
notebooks and tools that would otherwise guess the repository root or copy
a device size."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .model import format_size, parse_size
from .scenario import DEVICE_SIZES, PAGE_SIZE

__all__ = ["device_pages", "repo_root", "scenario_path"]


def repo_root() -> Path:
    """The devdax-lab checkout (the directory holding scenarios/ and
    notebooks/): lab/'s parent for an editable install, else the working
    directory or the nearest of its parents (a notebook runs from the
    checkout or from its notebooks/)."""
    here = Path(__file__).resolve().parent.parent
    cwd = Path.cwd().resolve()
    for root in (here, cwd, *cwd.parents):
        if (root / "scenarios").is_dir() and (root / "notebooks").is_dir():
            return root
    raise UserError(f"no devdax-lab checkout (scenarios/ and notebooks/) at {here} or above "
                    f"{cwd}: run from a checkout")


def scenario_path(name: str) -> Path:
    """``scenarios/NAME.toml`` of the checkout (NAME with or without .toml)."""
    return repo_root() / "scenarios" / (name if name.endswith(".toml") else f"{name}.toml")


def device_pages(align: int | str) -> int:
    """4K pages of the default device with alignment *align* ("4K", "2M",
    "1G"): its usable size (scenario.DEVICE_SIZES) in 4K pages."""
    size = DEVICE_SIZES.get(parse_size(align))
    if size is None:
        known = ", ".join(format_size(a) for a in DEVICE_SIZES)
        raise UserError(f"no default device is {align}-aligned (known: {known})")
    return size // PAGE_SIZE
