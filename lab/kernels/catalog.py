"""``lab/data/kernel/catalog.toml``: the named kernels, which Debian packages hold
them and where their files are inside (pure: parsing and templates)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.data import data_path
from lab.errors import UserError

__all__ = ["CATALOG_PATH", "ROLES", "AptSource", "CatalogEntry", "load_catalog", "parse_catalog"]


CATALOG_PATH = data_path("kernel", "catalog.toml")


@dataclass(frozen=True)
class AptSource:
    """Where a kernel's packages come from: the machine's apt configuration
    (``suite is None``) or a private one for one suite of the Debian archive."""

    suite: str | None = None
    components: tuple[str, ...] = ("main",)

    @property
    def is_system(self) -> bool:
        return self.suite is None

    def __str__(self) -> str:
        return "system" if self.suite is None else f"{self.suite} {' '.join(self.components)}"


ROLES = ("image", "modules", "dbg")


PATHS = ("vmlinuz", "vmlinux", "modules", "module_debug")


@dataclass(frozen=True)
class CatalogEntry:
    """One named kernel of ``lab/data/kernel/catalog.toml``."""

    name: str
    description: str
    apt: AptSource
    abi_regex: str
    release_template: str
    packages: Mapping[str, str]  # role (image, modules, dbg) -> name template
    paths: Mapping[str, str]  # vmlinuz, vmlinux, modules, module_debug -> template
    modules: tuple[str, ...]
    module_dirs: tuple[str, ...]

    def release(self, abi: str) -> str:
        """``uname -r`` of the kernel with this ABI."""
        return self.release_template.format(abi=abi)

    def package(self, role: str, abi: str) -> str:
        return self.packages[role].format(abi=abi, release=self.release(abi))

    def path(self, key: str, abi: str) -> str:
        return self.paths[key].format(abi=abi, release=self.release(abi)).strip("/")

    def package_names(self, abi: str) -> list[str]:
        """The distinct packages, in processing order (image, modules, dbg)."""
        names: list[str] = []
        for role in ROLES:
            if (pkg := self.package(role, abi)) not in names:
                names.append(pkg)
        return names

    def abi_matches(self, abi: str) -> bool:
        """Whether *abi* is one this entry could resolve to."""
        rx = re.compile(self.abi_regex)
        return any(
            (m := rx.fullmatch(self.package(role, abi))) and m.group(1) == abi for role in ROLES
        )


def _check_template(where: str, template: Any, allowed: Iterable[str]) -> str:
    if not isinstance(template, str) or not template:
        raise UserError(f"catalog: {where} must be a non-empty string")
    try:
        template.format(**{k: "x" for k in allowed})
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"catalog: {where} = {template!r}: bad placeholder {e} "
            f"(allowed: {', '.join('{' + k + '}' for k in allowed)})"
        ) from e
    return template


def parse_catalog(text: str) -> dict[str, CatalogEntry]:
    """The named kernels of a catalog's TOML *text*, in file order.

    :raises UserError: naming the key that is missing or malformed.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"catalog: not valid TOML: {e}") from e
    modules = data.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise UserError("catalog: top-level `modules` must be a non-empty list of module names")
    module_dirs = data.get("module_dirs", [])
    if not isinstance(module_dirs, list) or not all(isinstance(d, str) for d in module_dirs):
        raise UserError("catalog: `module_dirs` must be a list of directories")
    kernels = data.get("kernels")
    if not isinstance(kernels, dict) or not kernels:
        raise UserError("catalog: no [kernels.NAME] tables")
    out: dict[str, CatalogEntry] = {}
    for name, k in kernels.items():
        where = f"kernels.{name}"
        if not isinstance(k, dict):
            raise UserError(f"catalog: {where} must be a table")
        for key in ("description", "apt", "abi_regex", "packages", "paths"):
            if key not in k:
                raise UserError(f"catalog: {where}.{key} is missing")
        apt = k["apt"]
        if apt == "system":
            source = AptSource()
        elif isinstance(apt, dict) and isinstance(apt.get("suite"), str):
            comps = apt.get("components", ["main"])
            if isinstance(comps, str):
                comps = comps.split()
            source = AptSource(apt["suite"], tuple(comps))
        else:
            raise UserError(f'catalog: {where}.apt must be "system" or {{ suite = "…" }}')
        try:
            rx = re.compile(k["abi_regex"])
        except (re.error, TypeError) as e:
            raise UserError(f"catalog: {where}.abi_regex is not a regex: {e}") from e
        if rx.groups < 1:
            raise UserError(f"catalog: {where}.abi_regex needs a group capturing the ABI")
        release = _check_template(f"{where}.release", k.get("release", "{abi}"), ["abi"])
        packages, paths = k["packages"], k["paths"]
        if not isinstance(packages, dict) or not isinstance(paths, dict):
            raise UserError(f"catalog: {where}.packages and {where}.paths must be tables")
        for role in ROLES:
            if role not in packages:
                raise UserError(f"catalog: {where}.packages.{role} is missing")
            _check_template(f"{where}.packages.{role}", packages[role], ["abi", "release"])
        if packages["dbg"] == packages["modules"]:
            raise UserError(f"catalog: {where}: the dbg package must differ from the modules one")
        for key in PATHS:
            if key not in paths:
                raise UserError(f"catalog: {where}.paths.{key} is missing")
            _check_template(f"{where}.paths.{key}", paths[key], ["abi", "release"])
        out[name] = CatalogEntry(
            name=name,
            description=str(k["description"]),
            apt=source,
            abi_regex=k["abi_regex"],
            release_template=release,
            packages={r: packages[r] for r in ROLES},
            paths={p: paths[p] for p in PATHS},
            modules=tuple(m.replace("-", "_") for m in modules),
            module_dirs=tuple(d.strip("/") for d in module_dirs),
        )
    return out


def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    """:func:`parse_catalog` of ``lab/data/kernel/catalog.toml`` (or *path*)."""
    path = path or CATALOG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read the kernel catalog {path}: {e.strerror}") from e
    return parse_catalog(text)
