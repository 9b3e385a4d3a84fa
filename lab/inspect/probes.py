"""What the running kernel does, found by probing its code and types rather
than comparing version numbers."""

from __future__ import annotations

import drgn

__all__ = ["FOLIO_INSERTS", "PFN_INSERTS", "dax_fault_inserts", "counts_device_dax_mappings"]

# The insert functions a device-dax fault may call. Before "device/dax:
# properly refcount device dax pages when mapping" (Linux 6.15) the fault
# inserted PFNs (no folio reference, no mapcount); since then it maps the
# folio (a reference and a mapcount per entry).
FOLIO_INSERTS = ("vmf_insert_page_mkwrite", "vmf_insert_folio_pmd", "vmf_insert_folio_pud")
PFN_INSERTS = ("vmf_insert_mixed", "vmf_insert_pfn_pmd", "vmf_insert_pfn_pud")
# The device-dax fault handlers (drivers/dax/device.c); the per-level
# helpers are usually inlined into dev_dax_huge_fault.
_FAULT_FUNCTIONS = ("dev_dax_huge_fault", "__dev_dax_pte_fault", "__dev_dax_pmd_fault",
                    "__dev_dax_pud_fault", "dev_dax_fault")


def _symbol(prog: drgn.Program, name: str) -> drgn.Symbol | None:
    try:
        return prog.symbol(name)
    except LookupError:
        return None


def dax_fault_inserts(prog: drgn.Program) -> set[str]:
    """The insert functions (:data:`FOLIO_INSERTS`, :data:`PFN_INSERTS`)
    that the loaded device-dax fault handlers call directly: every ``call
    rel32`` (0xe8) in their code whose target is one of them.

    :return: their names (empty if the handlers are not loaded).
    """
    key = "devdax-lab.dax_fault_inserts"
    try:
        return prog.cache[key]
    except KeyError:
        pass
    targets = {}
    for name in FOLIO_INSERTS + PFN_INSERTS:
        sym = _symbol(prog, name)
        if sym is not None:
            targets[sym.address] = name
    found: set[str] = set()
    for fn in _FAULT_FUNCTIONS:
        sym = _symbol(prog, fn)
        if sym is None or not sym.size:
            continue
        code = prog.read(sym.address, sym.size)
        for i in range(len(code) - 4):
            if code[i] != 0xE8:
                continue
            rel = int.from_bytes(code[i + 1:i + 5], "little", signed=True)
            target = (sym.address + i + 5 + rel) & 0xFFFFFFFFFFFFFFFF
            if target in targets:
                found.add(targets[target])
    prog.cache[key] = found
    return found


def counts_device_dax_mappings(prog: drgn.Program) -> bool | None:
    """Whether a device-dax fault on this kernel maps the folio (takes a
    reference and a mapcount per entry) rather than inserting a PFN.

    :return: True or False from the fault handler's calls; None when the
        device-dax driver is not loaded or calls neither kind.
    """
    calls = dax_fault_inserts(prog)
    if calls & set(FOLIO_INSERTS):
        return True
    if calls & set(PFN_INSERTS):
        return False
    return None
