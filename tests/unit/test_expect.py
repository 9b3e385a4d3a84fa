"""[[expect]] tables: checked before boot with one-line errors, and judged
on the frames of recorded runs (tests/golden/records)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lab import timeline as tl
from lab.expect import check_expectations, failed
from lab.scenario import ScenarioError, load_scenario, validate_text

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(GOLDEN))

from records import load  # noqa: E402

BASE = (ROOT / "scenarios" / "fork-share.toml").read_text().split("[[expect]]")[0]


def _frames(name: str):
    runs = load(GOLDEN / "records" / f"{name}.json")
    return {"timeline": tl.df_timeline(runs), "steps": tl.df_steps(runs)}


def _scenario(expect: str):
    return validate_text(BASE + "\n[[expect]]\n" + expect, "scenarios/x.toml")


@pytest.mark.parametrize("expect, message", [
    ('step = 9\nmap = "m"\npage = 0\nfield = "refcount"\nequals = 1',
     "expect 1: step: must be a step number 0-6 or a label, not 9"),
    ('step = "nope"\nmap = "m"\npage = 0\nfield = "refcount"\nequals = 1',
     'expect 1: step: no step labelled "nope"'),
    ('step = 2\nmap = "x"\npage = 0\nfield = "refcount"\nequals = 1',
     'expect 1: map: no mapping "x" (mappings: "m")'),
    ('step = 2\nmap = "m"\npage = 8\nfield = "refcount"\nequals = 1',
     'expect 1: page: must be a page of "m" (0-7), not 8'),
    ('step = 2\nmap = "m"\npage = 0\nfield = "refcnt"\nequals = 1',
     'expect 1: field: "refcnt" is not a field of a page'),
    ('step = 2\nmap = "m"\npage = 0\nfield = "refcount"\nequals = 1\nat_most = 2',
     "expect 1: at_most: give exactly one of equals, at_least, at_most, delta"),
    ('step = 2\nmap = "m"\npage = 0\nfield = "refcount"\nat_least = "2"',
     "expect 1: at_least: must be an integer"),
    ('step = 2\nmap = "m"\npage = 0\nfield = "refcount"\nequals = 1\nsince = "start"',
     "expect 1: since: only a delta is measured since a step"),
    ('step = 2\nfield = "refcount"\nequals = 1',
     "expect 1: map: name the object: map and page, device = true, or proc"),
    ('step = 2\nproc = "z"\nfield = "file_pages"\nequals = 1',
     'expect 1: proc: no process "z" (processes: "a", "b")'),
    ('step = 2\nmap = "m"\npage = 0\nfield = "refcount"\nequals = 1\nwhat = 1',
     "expect 1: what: unknown field"),
    ('step = 2\nmap = "m"\npage = 0\nfield = "pt_level"\nat_least = 1',
     'expect 1: at_least: "pt_level" is not a number: compare it with equals'),
    ('step = 2\nmap = "m"\npage = 0\nfield = "refcount"\nequals = "2"',
     'expect 1: equals: "refcount" is a number, not string "2"'),
    ('step = 0\nmap = "m"\npage = 0\nfield = "refcount"\ndelta = 0',
     "expect 1: step: a delta needs a step before it"),
])
def test_bad_expectations_are_one_line_before_boot(expect, message):
    with pytest.raises(ScenarioError) as e:
        _scenario(expect)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("scenarios/x.toml: expect 1: ")


def test_the_shipped_expectations_hold_on_the_recorded_runs():
    for name in ("fork-share", "fault-2m", "pin-longterm", "splice-transient",
                 "partial-munmap-2m", "hwpoison-4k"):
        scenario = load_scenario(ROOT / "scenarios" / f"{name}.toml")
        assert scenario.expect, f"{name} has no expectations"
        kernels = {e.kernel for e in scenario.expect}
        assert {"before", "after"} <= kernels | {"*"} and kernels - {"*"}, name
        runs = load(GOLDEN / "records" / f"{name}.json")
        frames = {"timeline": tl.df_timeline(runs), "steps": tl.df_steps(runs),
                  "processes": tl.df_processes(runs)}
        result = check_expectations(scenario.expect, frames, ["before", "after"])
        assert len(failed(result)) == 0, failed(result)["message"].tolist()


def test_a_wrong_expectation_fails_with_one_line():
    s = _scenario('step = "b: touch 2, 3, 6"\nkernel = "af*"\nmap = "m"\npage = 2\nproc = "b"\n'
                  'field = "refcount"\nequals = 2\nwhy = "wrong on purpose"')
    result = check_expectations(s.expect, _frames("fork-share"), ["before", "after"])
    assert list(result["kernel"]) == ["after"]  # the glob picks the kernel
    (row,) = failed(result).itertuples()
    assert row.message == ("expect 1 FAILS on after at step 4 (touch): m page 2 (b) refcount "
                           "== 2, actual 3")


def test_delta_since_previous_and_start():
    s = _scenario('step = 4\nmap = "m"\npage = 6\nfield = "refcount"\ndelta = 1\n'
                  'kernel = "after"\n\n[[expect]]\nstep = 6\nmap = "m"\npage = 6\n'
                  'field = "refcount"\ndelta = 0\nsince = "start"')
    result = check_expectations(s.expect, _frames("fork-share"), ["before", "after"])
    assert result["passed"].all(), result["message"].tolist()
    assert list(result["wanted"]) == ["changed by +1 since the previous step",
                                      "changed by +0 since step 0", "changed by +0 since step 0"]


def test_every_shipped_scenario_states_expectations_for_both_kernels():
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        scenario = load_scenario(path)
        kernels = {e.kernel for e in scenario.expect}
        assert "after" in kernels and "before" in kernels, path.name
        assert all(e.why for e in scenario.expect), f"{path.name}: an expectation says no why"
