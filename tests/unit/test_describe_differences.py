"""describe_differences: the sentence is built from the fields that differ,
says "consistent with", and names the refcount series only for its own
pattern (refcount and a mapcount up by the same number of mappings on one
kernel, the mapcount unmapped on the other). Frames go through df_diff,
as in a real compare."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lab.timeline import TIMELINE_COLUMNS, describe_differences, df_diff

SERIES = "device/dax: properly refcount device dax pages when mapping"
KERNELS = ["before", "after"]
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "timeline"


def frame(rows: dict[str, dict]) -> pd.DataFrame:
    """One watched page at step 1 (touch), one row per kernel; *rows* gives
    each kernel's counters over an order-0 default."""
    base = {"step": 1, "action": "touch", "proc": "a", "map": "m", "page": 0, "pfn": 4096,
            "folio_pfn": 4096, "order": 0, "refcount": 1, "mapcount": -1,
            "large_mapcount": None, "entire_mapcount": None, "pincount": None,
            "pt_level": "PTE", "pt_special": False, "pt_devmap": None, "pgmap_ref": 100}
    records = [{**base, "kernel": k, **over} for k, over in rows.items()]
    return pd.DataFrame(records, columns=list(TIMELINE_COLUMNS)).astype(TIMELINE_COLUMNS)


def sentences(rows: dict[str, dict]) -> list[str]:
    return describe_differences(df_diff(frame(rows)), KERNELS)


def test_agreement_is_one_sentence():
    assert sentences({"before": {}, "after": {}}) == [
        "The kernels agree on every watched field at every step."]


def test_refcount_and_mapcount_up_by_the_mapping_names_the_series():
    (line,) = sentences({"before": {}, "after": {"refcount": 2, "mapcount": 0}})
    assert "on before: refcount 1, mapcount -1; on after: refcount 2, mapcount 0." in line
    assert "Consistent with" in line and SERIES in line
    assert "on after the mapping holds a folio reference and is counted in mapcount" in line


def test_two_mappings_count_twice():
    (line,) = sentences({"before": {}, "after": {"refcount": 3, "mapcount": 1}})
    assert SERIES in line and "each of the 2 mappings" in line


def test_pmd_pattern_through_entire_mapcount():
    big = {"order": 9, "large_mapcount": -1, "entire_mapcount": -1, "pincount": 0,
           "pt_level": "PMD"}
    (line,) = sentences({"before": {**big, "pt_devmap": True},
                         "after": {**big, "refcount": 2, "large_mapcount": 0,
                                   "entire_mapcount": 0}})
    differing = line.split(":", 1)[1].split(".")[0]
    assert " mapcount" not in differing  # each page's own _mapcount agrees (-1)
    assert SERIES in line and "counted in entire_mapcount" in line
    assert "vm_normal_page_pmd()" in line  # devmap only, no special bit on a PMD


def test_only_refcount_differs_does_not_blame_the_series():
    (line,) = sentences({"before": {}, "after": {"refcount": 2}})
    assert SERIES not in line
    assert "Only the refcount differs" in line and "consistent with" in line
    assert "mapcount" not in line.split(":", 1)[1].split(".")[0]  # not listed as differing
    assert "on after" in line  # the kernel holding the extra reference


def test_only_mapcount_differs_does_not_blame_the_series():
    (line,) = sentences({"before": {}, "after": {"mapcount": 0}})
    assert SERIES not in line
    assert "Only mapcount differs" in line and "consistent with" in line
    assert "refcount" not in line.split(":", 1)[1].split(".")[0]


def test_both_differ_by_unequal_amounts_is_not_the_series():
    (line,) = sentences({"before": {}, "after": {"refcount": 3, "mapcount": 0}})
    assert SERIES not in line and "not the pattern" in line


def test_both_differ_but_mapcount_counted_on_both_is_not_the_series():
    (line,) = sentences({"before": {"refcount": 2, "mapcount": 0},
                         "after": {"refcount": 3, "mapcount": 1}})
    assert SERIES not in line


def test_opposite_directions_are_not_the_series():
    (line,) = sentences({"before": {"mapcount": 0}, "after": {"refcount": 2}})
    assert SERIES not in line and "not the pattern" in line


def test_entry_bits_explained_alone():
    (line,) = sentences({"before": {"pt_special": True, "pt_devmap": True},
                         "after": {"pt_special": False}})
    assert "vm_normal_page()" in line and SERIES not in line
    assert "refcount" not in line


def test_golden_fork_share_names_the_series_at_every_difference():
    t = pd.read_parquet(GOLDEN / "compare-fork-share" / "timeline.parquet")
    kernels = list(dict.fromkeys(t["kernel"]))
    lines = describe_differences(df_diff(t), kernels)
    assert lines and all(SERIES in x for x in lines)
    two = [x for x in lines if "refcount 3, mapcount 1" in x]
    assert two and all("each of the 2 mappings" in x for x in two)
