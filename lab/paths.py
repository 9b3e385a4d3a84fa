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
    """The checkout this package runs from (it holds scenarios/ and
    notebooks/): the package is installed editable, so it is lab/'s parent."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "scenarios").is_dir():
        raise UserError(f"{root} has no scenarios/: run from a devdax-lab checkout")
    return root


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
