"""lab.paths: the checkout's files and the default devices' sizes, so that
notebooks neither guess the repository root nor copy a device size."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import UserError
from lab.model import DEFAULT_DAX
from lab.paths import device_pages, repo_root, scenario_path
from lab.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_repo_root_is_this_checkout():
    assert repo_root() == ROOT


def test_repo_root_from_the_working_directory(monkeypatch, tmp_path):
    """An installed (not editable) package: the checkout is found from the
    notebook's working directory; nowhere, a one-line UserError."""
    import lab.paths as paths

    fake = tmp_path / "site-packages" / "lab" / "paths.py"
    monkeypatch.setattr(paths, "__file__", str(fake))
    monkeypatch.chdir(ROOT / "notebooks")
    assert repo_root() == ROOT
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no devdax-lab checkout"):
        repo_root()


def test_scenario_path_with_and_without_suffix():
    assert scenario_path("fault-4k") == scenario_path("fault-4k.toml") == \
        ROOT / "scenarios" / "fault-4k.toml"
    assert load_scenario(scenario_path("fault-4k")).name == "fault-4k"


def test_device_pages_of_the_default_devices():
    # 1070 MiB on the 4K device: the pgmap count notebook 05 asks about is this + 1
    assert device_pages("4K") == 273_920
    assert device_pages(2 << 20) == 502 * 256
    assert {d.align for d in DEFAULT_DAX} <= {4096, 2 << 20}
    with pytest.raises(UserError, match="no default device is 8K-aligned"):
        device_pages("8K")
