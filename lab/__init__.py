"""devdax-lab: boot kernels with device-dax in QEMU and read folio, dev_pagemap
and page-table state live with drgn."""

__version__ = "0.1.0"
