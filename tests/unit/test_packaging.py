"""pyproject.toml is the one source of Python dependencies; environment.yml
repeats them for conda users and must not drift."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    pip_lines = re.findall(r'^\s+- "([^"]+)"\s*$', (ROOT / "environment.yml").read_text(), re.M)
    listed = {_name(r) for r in pip_lines if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    assert '"-e .[test]"' in (ROOT / "environment.yml").read_text()


def test_console_script_points_at_cli_main():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["devdax-lab"] == "lab.cli:main"
    from lab import cli

    assert callable(cli.main)


def test_the_pytest_plugin_is_an_entry_point():
    import importlib.metadata
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {"devdax_lab": "lab.pytest_plugin"}
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="pytest11")}
    assert installed.get("devdax_lab") == "lab.pytest_plugin"  # make setup reinstalls on change
