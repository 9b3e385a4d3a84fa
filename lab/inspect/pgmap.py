"""``struct dev_pagemap`` of a device and its ``percpu_ref`` count."""

from __future__ import annotations

import drgn
from drgn import Object
from drgn.helpers.linux.cpumask import for_each_possible_cpu
from drgn.helpers.linux.percpu import per_cpu_ptr
from drgn.helpers.linux.xarray import xa_load

from ..model import PercpuRefState, PgmapState
from .attach import InspectError

__all__ = ["find_dev_pagemap", "pgmap_state", "percpu_ref_state"]

# include/linux/percpu-refcount.h: __PERCPU_REF_ATOMIC = 1 << 0,
# __PERCPU_REF_DEAD = 1 << 1 (flag bits in the low bits of percpu_count_ptr).
_PERCPU_REF_ATOMIC = 1
_PERCPU_REF_DEAD = 2


def find_dev_pagemap(prog: drgn.Program, pfn: int) -> Object:
    """The ``struct dev_pagemap *`` covering *pfn*, or a NULL pointer.

    Looks the PFN up in ``pgmap_array`` as get_dev_pagemap() does.
    """
    entry = xa_load(prog["pgmap_array"].address_of_(), pfn)
    return drgn.cast("struct dev_pagemap *", entry)


def percpu_ref_state(ref: Object) -> PercpuRefState:
    """Sum a ``struct percpu_ref`` as percpu_ref_read()/percpu_ref_is_zero() would.

    In per-CPU mode the count is the atomic part plus every possible CPU's
    counter, minus PERCPU_COUNT_BIAS (1 << (BITS_PER_LONG - 1)) which the
    atomic part carries while per-CPU counting is on. Only the sum means
    anything: gets and puts may land on different CPUs.
    """
    prog = ref.prog_
    ptr = ref.percpu_count_ptr.value_()
    atomic = ref.data.count.counter.value_()
    if ptr & _PERCPU_REF_DEAD:
        mode = "dead"
    elif ptr & _PERCPU_REF_ATOMIC:
        mode = "atomic"
    else:
        mode = "percpu"
    if mode != "percpu":
        return PercpuRefState(count=atomic, mode=mode)
    bits = 8 * prog.type("unsigned long").size
    counters = Object(prog, "unsigned long *", ptr & ~3)
    total = sum(per_cpu_ptr(counters, cpu)[0].value_() for cpu in for_each_possible_cpu(prog))
    count = (atomic + total - (1 << (bits - 1))) % (1 << bits)
    if count >= 1 << (bits - 1):
        count -= 1 << bits  # a negative count is a bug worth seeing as such
    return PercpuRefState(count=count, mode=mode)


def pgmap_state(prog: drgn.Program, pgmap: Object | int) -> PgmapState:
    """The state of a ``struct dev_pagemap`` (pointer object or address).

    :raises InspectError: if *pgmap* is NULL.
    """
    if not isinstance(pgmap, Object):
        pgmap = Object(prog, "struct dev_pagemap *", pgmap)
    if not pgmap:
        raise InspectError("no dev_pagemap (NULL)")
    nr = pgmap.nr_range.value_()
    ranges = tuple((pgmap.ranges[i].start.value_(), pgmap.ranges[i].end.value_()) for i in range(nr))
    try:
        type_name = pgmap.type.format_(type_name=False)
    except drgn.FaultError:
        type_name = str(pgmap.type.value_())
    return PgmapState(
        address=pgmap.value_(),
        type=type_name.split(")")[-1].strip(),
        ranges=ranges,
        vmemmap_shift=pgmap.vmemmap_shift.value_(),
        ops=pgmap.ops.value_(),
        flags=pgmap.flags.value_(),
        ref=percpu_ref_state(pgmap.ref),
    )
