"""Named kernels from Debian's archive, fetched once into the cache, and the
developer's own kernels (built with ``devdax-lab kernel build``, or a tree
built in place, given by path).

The lab compares two kernels: ``before`` (Debian 12's 6.12, without "device/dax:
properly refcount device dax pages when mapping") and ``after`` (Debian sid's
7.2, with it). Building them would take an hour; Debian ships the exact
binaries with full DWARF, so this package downloads them with apt and keeps
only what the lab uses: the bzImage, the DWARF vmlinux, the device-dax
modules (decompressed, in load order) and their debug files.

Nothing is hard-coded about versions: ``lab/data/kernel/catalog.toml`` gives a regex
over package names and templates, and the newest matching ABI in the apt
index is taken. ``before`` comes through the machine's apt configuration;
``after`` through a private apt configuration under the cache (the machine's
sources are never changed).

One module a job, the pure ones apart from those doing I/O:

- :mod:`.catalog` the catalog (pure); :mod:`.versions` Debian version order
  (pure); :mod:`.modinfo` a module's ELF ``.modinfo`` and the load order
  (pure);
- :mod:`.apt` sources parsing (pure) and apt-get/apt-cache (I/O);
- :mod:`.extract` one streaming pass over a .deb's tar (``scan_tar`` pure
  over a stream, ``scan_deb`` owns dpkg-deb);
- :mod:`.entries` cache entries and their verification against the manifest
  (sizes and sha256; a stamp of size and mtime per file keeps a second run
  from re-hashing 800 MB);
- :mod:`.fetching` plan, download, extract, write the entry (with
  :func:`lab.cache.atomic_entry`, under :func:`lab.cache.locked`), so an
  interrupted fetch leaves nothing half-written;
- :mod:`.built` the registry of built kernels and trees built in place (read
  only; :mod:`lab.build` writes it);
- :mod:`.lookup` names to files (:func:`resolve`, :func:`fetch`,
  :func:`status`, :func:`known_kernels`).

This package imports nothing above it (not :mod:`lab.build`, which imports it).
"""

from __future__ import annotations

from .apt import (
    archive_source,
    parse_control,
    private_apt_options,
    private_sources_list,
    sources_uris,
)
from .catalog import CATALOG_PATH, AptSource, CatalogEntry, load_catalog, parse_catalog
from .entries import EntryCheck, check_manifest, kernel_dir, verify_entry
from .errors import CommandError, KernelError
from .extract import FileRecord, TarScan, scan_tar
from .lookup import KernelStatus, fetch, identity, identity_mismatch, known_kernels, resolve, status
from .modinfo import load_order, module_name, parse_modinfo
from .versions import compare_versions, newest_first, pick_newest

__all__ = [
    "CATALOG_PATH",
    "AptSource",
    "CatalogEntry",
    "CommandError",
    "EntryCheck",
    "FileRecord",
    "KernelError",
    "KernelStatus",
    "TarScan",
    "archive_source",
    "check_manifest",
    "compare_versions",
    "fetch",
    "identity",
    "identity_mismatch",
    "kernel_dir",
    "known_kernels",
    "load_catalog",
    "load_order",
    "module_name",
    "newest_first",
    "parse_catalog",
    "parse_control",
    "parse_modinfo",
    "pick_newest",
    "private_apt_options",
    "private_sources_list",
    "resolve",
    "scan_tar",
    "sources_uris",
    "status",
    "verify_entry",
]
