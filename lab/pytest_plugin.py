"""pytest plugin: scenario files as test items, judged by the lab's verdict.

    pytest --devdax-kernel after scenarios/
    pytest --devdax-kernel before,after scenarios/fork-share.toml -k fork

Registered as the ``devdax_lab`` ``pytest11`` entry point, and inert unless
``--devdax-kernel`` is given: then every ``*.toml`` collected that is a
scenario becomes one item per kernel (``fork-share.toml::after``), which
runs the scenario (`lab.experiment.run_experiment`) and fails with every
violated invariant and failed expectation, earliest step first; a kernel
that cannot be tested (build, boot, agent) fails with that reason in one
line. JUnit XML, ``-k`` and ``-x`` come from pytest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .errors import VerdictFailed

__all__ = ["ScenarioFile", "ScenarioItem", "ScenarioFailed"]


def pytest_addoption(parser) -> None:
    group = parser.getgroup("devdax-lab")
    group.addoption("--devdax-kernel", action="store", default=None, metavar="NAMES",
                    help="run scenario files (*.toml) as tests on these kernels (comma list: "
                         "before, after, a built kernel, a tree path)")
    group.addoption("--devdax-out", action="store", default=None, metavar="DIR",
                    help="write each item's run directory under DIR/SCENARIO/KERNEL")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "live: boots a real kernel in QEMU (devdax-lab)")


def pytest_collect_file(parent, file_path: Path):
    if file_path.suffix == ".toml" and parent.config.getoption("devdax_kernel"):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFailed(VerdictFailed):
    """The scenario's verdict on one kernel: its failure lines."""

    def __init__(self, lines: list[str], report: Path | None = None):
        super().__init__(lines[0] if lines else "")
        self.lines = lines
        self.report = report


class ScenarioFile(pytest.File):
    def collect(self):
        from .scenario import load_scenario

        text = self.path.read_text(encoding="utf-8", errors="replace")
        if "[[step]]" not in text:  # another kind of TOML file
            return
        from .errors import UserError

        try:
            load_scenario(self.path)
        except UserError as exc:  # a bad scenario is a collection error, in one line
            raise self.CollectError(str(exc)) from exc
        kernels = [k for k in self.config.getoption("devdax_kernel").split(",") if k]
        for kernel in kernels:
            yield ScenarioItem.from_parent(self, name=kernel, kernel=kernel)


class ScenarioItem(pytest.Item):
    def __init__(self, *, kernel: str, **kwargs):
        super().__init__(**kwargs)
        self.kernel = kernel
        self.add_marker(pytest.mark.live)

    def runtest(self) -> None:
        from .experiment import run_experiment, verdict, write_experiment

        exp = verdict(lambda: run_experiment(self.path, [self.kernel], say=lambda *_: None))
        report = None
        out = self.config.getoption("devdax_out")
        if out:
            report = write_experiment(exp, Path(out) / self.path.stem / _safe(self.kernel))
        n = 0 if exp.expectations is None else len(exp.expectations)
        self.user_properties.append(("expectations", n))
        self.user_properties.append(("violations", len(exp.violations)))
        if exp.failures:
            raise ScenarioFailed(exp.failures, report)

    def repr_failure(self, excinfo, style=None):
        from .errors import LabError

        if isinstance(excinfo.value, ScenarioFailed):
            lines = [f"{self.path.name} on {self.kernel}: {len(excinfo.value.lines)} failure(s)",
                     *(f"  {line}" for line in excinfo.value.lines)]
            if excinfo.value.report:
                lines.append(f"  report: {excinfo.value.report}")
            return "\n".join(lines)
        if isinstance(excinfo.value, LabError):
            return f"{self.path.name} on {self.kernel}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.kernel}"


def _safe(name: str) -> str:
    return name.strip("/").replace("/", "_") or "kernel"
