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

__all__ = ["PageArray", "page_dtype", "read_pages", "decode_pages"]


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


def decode_pages(raw: bytes, first_pfn: int, vmemmap_base: int, dtype: np.dtype) -> PageArray:
    """Decode *raw* (consecutive struct pages starting at *first_pfn*).

    :param vmemmap_base: address of the struct page of PFN 0
    """
    pages = np.frombuffer(raw, dtype=dtype)
    pfn = np.arange(first_pfn, first_pfn + len(pages), dtype=np.uint64)
    head = pages["head"]
    is_tail = (head & 1).astype(bool)
    head_pfn = pfn.copy()
    head_pfn[is_tail] = ((head[is_tail] - 1) - np.uint64(vmemmap_base)) // np.uint64(dtype.itemsize)
    return PageArray(pfn=pfn, flags=pages["flags"].copy(), refcount=pages["_refcount"].copy(),
                     mapcount=pages["_mapcount"].copy(), head_pfn=head_pfn)


def read_pages(prog: drgn.Program, first_pfn: int, count: int) -> PageArray:
    """Read and decode the struct pages of PFNs ``first_pfn .. first_pfn+count-1``."""
    key = "devdax-lab.page_dtype"
    dtype = prog.cache.get(key)
    if dtype is None:
        dtype = prog.cache[key] = page_dtype(prog)
    base = pfn_to_page(prog, 0).value_()
    raw = prog.read(base + first_pfn * dtype.itemsize, count * dtype.itemsize)
    return decode_pages(raw, first_pfn, base, dtype)
