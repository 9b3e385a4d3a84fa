"""``struct dev_pagemap`` of a device and its ``percpu_ref`` count."""

from __future__ import annotations

import drgn
from drgn import Object

from .. import drgn_helpers as helpers
from ..model import PercpuRefState, PgmapState
from .attach import InspectError

__all__ = ["find_dev_pagemap", "pgmap_state", "percpu_ref_state"]


def find_dev_pagemap(prog: drgn.Program, pfn: int) -> Object:
    """The ``struct dev_pagemap *`` covering *pfn*, or a NULL pointer
    (`lab.drgn_helpers.find_dev_pagemap`).

    :raises InspectError: on a kernel without ZONE_DEVICE / ``pgmap_array``.
    """
    try:
        return helpers.find_dev_pagemap(prog, pfn)
    except helpers.UnsupportedKernelError as exc:
        raise InspectError(str(exc)) from exc


def percpu_ref_state(ref: Object) -> PercpuRefState:
    """The summed count and mode of a ``struct percpu_ref``
    (`lab.drgn_helpers.percpu_ref_sum`)."""
    return PercpuRefState(count=helpers.percpu_ref_sum(ref), mode=helpers.percpu_ref_mode(ref))


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
