"""lab.progress: tqdm bars with the right units, readable off a terminal."""

import io

from lab import progress
from lab.progress import Bars


def _log(**kwargs) -> tuple[io.StringIO, Bars]:
    out = io.StringIO()
    return out, Bars(out, tty=False, notebook=False, **kwargs)


def test_off_a_tty_each_update_is_a_line_and_the_log_is_throttled():
    out, p = _log()
    for done in range(1001):
        p("download x", done * 1000, 1_000_000)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # the first and the last state: the others fall inside LOG_INTERVAL
    assert len(lines) == 2, lines
    assert lines[0].startswith("download x:   0%") and "0.00/1.00M" in lines[0]
    assert lines[1].startswith("download x: 100%") and "1.00M/1.00M" in lines[1]
    assert "B/s" in lines[1]  # bytes with their rate


def test_counted_units_steps_and_objects():
    out, p = _log()
    p("fork-share on after", 0, 3, unit="step")
    p("fork-share on after", 3, 3, unit="step")
    p("build mine", 10, None, unit="obj")
    p("build mine", 20, 20, unit="obj")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fork-share on after:   0%") and "0/3" in lines[0]
    assert "3/3" in lines[1] and "step/s" in lines[1]
    assert lines[-1].startswith("build mine: 100%") and "20/20" in lines[-1] and "obj/s" in lines[-1]


def test_a_step_without_a_size_and_repeated_end_reports():
    out, p = _log()
    p("download x", 0, 100)
    p("download x", 100, 100)
    p("download x", 100, 100)  # ignored: the stage has ended
    p("update idx", 0, 1)
    p("update idx", 1, 1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[2].startswith("update idx: running [") and lines[3].startswith("update idx: done [")


def test_on_a_tty_one_line_is_rewritten():
    out = io.StringIO()
    p = Bars(out, tty=True, notebook=False)
    p("extract x", 10, 100)
    p("extract x", 100, 100)
    text = out.getvalue()
    assert text.startswith("\rextract x:") and text.endswith("\n") and text.count("\n") == 1


def test_quiet_makes_bars_silent():
    try:
        progress.set_quiet(True)
        assert progress.bars() is progress.silent
    finally:
        progress.set_quiet(False)
    assert isinstance(progress.bars(), Bars)
