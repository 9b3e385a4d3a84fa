"""Every struct page of a device in one read, decoded with numpy.

The vmemmap is virtually contiguous, so the struct pages of a PFN range are
one block of memory: one read instead of a drgn object per field per page.
Field offsets and sizes come from drgn's type info, never from constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import drgn
import numpy as np
from drgn import offsetof
from drgn.helpers.linux.mm import pfn_to_page

__all__ = ["PageArray", "page_dtype", "head_encoding", "read_pages", "decode_pages"]


@dataclass(frozen=True)
class PageArray:
    """Per-page arrays for PFNs ``pfn[0] .. pfn[-1]``.

    ``refcount`` and ``mapcount`` are the raw ``_refcount`` and ``_mapcount``
    of each struct page (for a tail page the kernel keeps the folio's refcount
    in the head, so a tail's ``_refcount`` is 0). ``head_pfn`` is the folio
    head of each page (itself for a head or order-0 page).
    """

    pfn: np.ndarray
    flags: np.ndarray
    refcount: np.ndarray
    mapcount: np.ndarray
    head_pfn: np.ndarray

    def __len__(self) -> int:
        return len(self.pfn)


def _head_member(prog: drgn.Program) -> str:
    # struct page's compound_head became compound_info in Linux 7.1 (the low
    # bit still marks a tail page; the rest still points at the head page).
    for name in ("compound_head", "compound_info"):
        try:
            offsetof(prog.type("struct page"), name)
            return name
        except LookupError:
            continue
    raise LookupError("struct page has neither compound_head nor compound_info")


def _member_size(type_: drgn.Type, path: str) -> int:
    for part in path.split("."):
        type_ = type_.member(part).type
    return drgn.sizeof(type_)


_NUMPY_INT = {(8, False): "<u8", (4, True): "<i4", (4, False): "<u4"}


def page_dtype(prog: drgn.Program) -> np.dtype:
    """A numpy dtype laid out like ``struct page``, from drgn's type info."""
    page = prog.type("struct page")
    fields = {  # dtype field -> (struct page member, signed)
        "flags": ("flags", False),
        "_refcount": ("_refcount.counter", True),
        "_mapcount": ("_mapcount.counter", True),
        "head": (_head_member(prog), False),
    }
    return np.dtype({
        "names": list(fields),
        "formats": [_NUMPY_INT[_member_size(page, m), signed] for m, signed in fields.values()],
        "offsets": [offsetof(page, m) for m, _ in fields.values()],
        "itemsize": drgn.sizeof(page),
    })


def head_encoding(prog: drgn.Program) -> str:
    """How a tail page points at its head: ``"pointer"`` (head address + 1)
    or ``"mask"`` (page address & compound_info), as drgn's compound_head()
    decides it.

    Linux 7.1 ("mm: rework compound_head() for power-of-2 sizeof(struct
    page)", 8c846c879e22) stores a mask when sizeof(struct page) is a power of
    two and struct zone has vmemmap_tails.
    """
    if _head_member(prog) != "compound_info":
        return "pointer"
    size = drgn.sizeof(prog.type("struct page"))
    power_of_two = size & (size - 1) == 0
    return "mask" if power_of_two and prog.type("struct zone").has_member("vmemmap_tails") else "pointer"


def decode_pages(raw: bytes, first_pfn: int, vmemmap_base: int, dtype: np.dtype,
                 head_mode: str = "pointer") -> PageArray:
    """Decode *raw* (consecutive struct pages starting at *first_pfn*).

    :param vmemmap_base: address of the struct page of PFN 0
    :param head_mode: see :func:`head_encoding`
    """
    pages = np.frombuffer(raw, dtype=dtype)
    pfn = np.arange(first_pfn, first_pfn + len(pages), dtype=np.uint64)
    info = pages["head"]
    is_tail = (info & 1).astype(bool)
    size = np.uint64(dtype.itemsize)
    base = np.uint64(vmemmap_base)
    if head_mode == "mask":
        own = base + pfn[is_tail] * size
        head_addr = own & info[is_tail]
    else:
        head_addr = info[is_tail] - np.uint64(1)
    head_pfn = pfn.copy()
    head_pfn[is_tail] = (head_addr - base) // size
    return PageArray(pfn=pfn, flags=pages["flags"].copy(), refcount=pages["_refcount"].copy(),
                     mapcount=pages["_mapcount"].copy(), head_pfn=head_pfn)


def read_pages(prog: drgn.Program, first_pfn: int, count: int) -> PageArray:
    """Read and decode the struct pages of PFNs ``first_pfn .. first_pfn+count-1``."""
    key = "devdax-lab.page_layout"
    layout = prog.cache.get(key)
    if layout is None:
        layout = prog.cache[key] = (page_dtype(prog), head_encoding(prog))
    dtype, head_mode = layout
    base = pfn_to_page(prog, 0).value_()
    raw = prog.read(base + first_pfn * dtype.itemsize, count * dtype.itemsize)
    return decode_pages(raw, first_pfn, base, dtype, head_mode)
