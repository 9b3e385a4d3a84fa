"""devdax-lab: boot kernels with device-dax in QEMU and read folio, dev_pagemap
and page-table state live with drgn."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from lab import Lab` without importing drgn and pandas for every
    # `import lab` (the CLI's bad-input paths stay fast).
    if name == "Lab":
        from .api import Lab

        return Lab
    raise AttributeError(name)
