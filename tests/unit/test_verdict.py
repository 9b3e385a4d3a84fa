"""The verdict's exit codes without a VM: git bisect run's 0/1/125 from
what a run raised or found (lab.experiment.verdict, the CLI's _judge)."""

from __future__ import annotations

import pytest

from lab import cli, errors
from lab import timeline as tl
from lab.experiment import Experiment, verdict
from lab.model import RunResult
from lab.vm import GuestCrashed, VmError


def _exp(counts=True, violations=()):
    run = RunResult(scenario=None, kernel="after", kernel_spelling="after", release="7.2",
                    accel="tcg", device={},
                    counts_mappings=counts)
    return Experiment(None, [run], {}, [], list(violations), {})


def _raising(exc):
    def run():
        raise exc
    return run


def test_a_kernel_that_does_not_boot_is_untestable():
    with pytest.raises(errors.Untestable, match="could not be tested: QEMU exited") as e:
        verdict(_raising(VmError("QEMU exited with status 1\\nmore lines")))
    assert e.value.exit_status == 125 and "\n" not in str(e.value)


def test_a_crash_during_the_steps_is_a_bad_kernel():
    crash = GuestCrashed("the guest kernel crashed: Oops: general protection fault")
    crash.during_scenario = True
    with pytest.raises(errors.VerdictFailed, match="crashed during the scenario: the guest") as e:
        verdict(_raising(crash))
    assert e.value.exit_status == 1
    with pytest.raises(errors.Untestable):  # while booting: not the scenario's doing
        verdict(_raising(GuestCrashed("the guest kernel crashed while booting")))


def test_an_unknown_kind_of_kernel_is_untestable():
    with pytest.raises(errors.Untestable, match="could not tell whether after counts"):
        verdict(lambda: _exp(counts=None))
    assert verdict(lambda: _exp()).runs[0].counts_mappings is True


def test_judge_exits_0_or_raises_the_first_failure(capsys):
    assert cli._judge(_exp()) == 0
    assert "verdict: every invariant and 0 expectation(s) hold" in capsys.readouterr().out
    v = tl.Violation("rmap", "after", 4, "m", 2, "2 PTE(s) map the page, _mapcount says 1",
                     action="touch", field="mapcount", expected="1", actual="0")
    later = tl.Violation("no-leak", "after", 6, "m", 2, "refcount is 2 after everything")
    with pytest.raises(errors.VerdictFailed) as e:
        cli._judge(_exp(violations=[later, v]))
    assert str(e.value) == ("rmap at step 4 on after: 2 PTE(s) map the page, _mapcount says 1"
                            " (mapcount: expected 1, actual 0) (and 1 more)")
