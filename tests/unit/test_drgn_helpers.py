"""The drgn helpers stand alone: importable with drgn only, and the lab's
readers are built on them (no second copy of a probe)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("pandas", "plotly", "qemu", "numpy", "ipywidgets")


@pytest.mark.parametrize("module", ["lab.drgn_helpers", "lab.drgn_helpers.plugin"])
def test_helpers_import_without_the_lab_stack(module):
    code = (f"import sys, json, {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_helpers_carry_c_signatures():
    import lab.drgn_helpers as h

    for name in ("page_folio", "folio_ref_count", "folio_mapcount", "folio_entire_mapcount",
                 "folio_large_mapcount", "folio_pincount", "folio_maybe_dma_pinned",
                 "page_pgmap", "percpu_ref_sum", "page_table_walk"):
        doc = getattr(h, name).__doc__
        assert ":param" in doc and "``struct" in doc, name


def test_readers_use_the_helpers():
    import lab.drgn_helpers as h
    from lab.inspect import folio, pgmap, pgtable

    assert folio.has_member is h.has_member and folio.page_pgmap is h.page_pgmap
    assert pgtable.devmap_supported is h.pte_devmap_supported
    assert not hasattr(pgmap, "_PERCPU_REF_DEAD") and not hasattr(pgtable, "_SHIFTS")


def test_pte_bits_decode():
    from lab.drgn_helpers import decode_pte_bits

    raw = (1 << 57) | (1 << 9) | (1 << 7) | 0b1100011 | (0x240 << 12)
    bits = decode_pte_bits(raw)
    assert bits["present"] and bits["write"] and bits["huge"] and bits["special"]
    assert bits["devmap"] and bits["dirty"] and bits["young"] and not bits["nx"]
    assert "devmap" not in decode_pte_bits(raw, devmap=False)


def test_missing_pgmap_array_is_a_clear_error():
    """A Program whose kernel has no pgmap_array (here: no kernel at all)
    gets UnsupportedKernelError, which is no LookupError."""
    import drgn

    from lab.drgn_helpers import UnsupportedKernelError, find_dev_pagemap, for_each_dev_pagemap

    prog = drgn.Program(drgn.host_platform)
    assert not issubclass(UnsupportedKernelError, LookupError)
    with pytest.raises(UnsupportedKernelError, match="pgmap_array"):
        find_dev_pagemap(prog, 0x240000)
    with pytest.raises(UnsupportedKernelError, match="pgmap_array"):
        list(for_each_dev_pagemap(prog))


def test_plugin_is_registered_for_drgn():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["drgn.plugins"] == {
        "devdax_lab": "lab.drgn_helpers.plugin"}


def test_plugin_registers_its_commands():
    from drgn.commands import DEFAULT_COMMAND_NAMESPACE

    import lab.drgn_helpers.plugin  # noqa: F401

    for name in ("folio", "pgmap", "pte", "devdax"):
        assert name in DEFAULT_COMMAND_NAMESPACE._commands


def test_dump_at_values():
    from lab.errors import UserError
    from lab.inspect.core import dump_due, parse_dump_at

    assert parse_dump_at("0") == 0 and parse_dump_at("4") == 4
    assert parse_dump_at("complaint") == "complaint"
    for bad in ("-1", "three", "", "4.5"):
        with pytest.raises(UserError, match="step number"):
            parse_dump_at(bad)
    assert dump_due(4, 4, 0, False) and not dump_due(4, 3, 5, False)
    assert not dump_due(4, 4, 0, True)  # one dump per run
    assert dump_due("complaint", 2, 1, False) and not dump_due("complaint", 2, 0, False)
    assert not dump_due(None, 0, 9, False)


def test_inspect_refuses_a_missing_core_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lab.cli", "inspect", "--core",
                          str(tmp_path / "nope"), "--kernel", "after"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"devdax-lab: no core dump at {tmp_path / 'nope'} (write one with `devdax-lab run "
        f"--dump-at STEP` or Lab.dump)"]
