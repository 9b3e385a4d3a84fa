"""pyproject.toml is the one source of Python dependencies; environment.yml
repeats them for conda users and must not drift."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


# pyproject name -> conda-forge name where they differ (None: not on
# conda-forge, listed under environment.yml's pip:)
CONDA_NAMES = {"qemu.qmp": "python-qemu-qmp", "dask": "dask-core", "playwright": "playwright-python"}


def _bound(requirement: str) -> str:
    """``plotly>=6`` -> ``>=6`` (spaces dropped: conda writes ``plotly >=6``)."""
    return requirement.strip()[len(_name(requirement)):].split(";")[0].replace(" ", "")


def test_environment_yml_lists_pyproject_dependencies_with_the_same_bounds():
    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {_name(r): _bound(r) for r in project["dependencies"] + extras["test"] + extras["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = {_name(d): _bound(d) for d in env["dependencies"] if isinstance(d, str)}
    pip = {_name(r): _bound(r) for d in env["dependencies"] if isinstance(d, dict)
           for r in d.get("pip", [])}
    assert conda.pop("python") == _bound("python" + project["requires-python"])
    assert conda.pop("pip") == ""
    for name, bound in wanted.items():
        conda_name = CONDA_NAMES.get(name, name)
        if conda_name is None:
            assert pip.get(name) == bound, f"{name}{bound} belongs in environment.yml's pip: list"
        else:
            assert conda.get(conda_name) == bound, f"environment.yml: want {conda_name} {bound}"
    unexpected = set(conda) - {CONDA_NAMES.get(n, n) for n in wanted} | set(pip) - set(wanted)
    assert not unexpected, f"environment.yml lists what pyproject.toml does not: {unexpected}"


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


def _installed_copy(tmp_path: Path) -> Path:
    """A fresh venv with this project installed from a copy of its source by
    ``pip install`` (not editable, no build isolation, no dependencies): the
    dependencies come from this venv's site-packages through a .pth line, so
    nothing is downloaded. Returns the venv's bin directory."""
    import shutil
    import site
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "lab", src / "lab", ignore=shutil.ignore_patterns("__pycache__", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = next((venv / "lib").glob("python3*/site-packages"))
    # A path line adds the directory but runs none of its .pth files: the
    # editable install of the checkout stays out of the fresh venv.
    (purelib / "deps-from-test-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
                   check=True, capture_output=True, text=True)
    shutil.rmtree(src)  # the installed copy must not need its source
    return venv / "bin"


def test_pip_install_not_editable_finds_its_data(tmp_path):
    import os
    import subprocess

    bin_dir = _installed_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv):
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)

    where = run(str(bin_dir / "python"), "-c",
                "import lab, lab.image as i, lab.build as b, lab.kernels as k;"
                "print(lab.__file__); i._recipe(); print(b.FRAGMENT_PATH.read_text()[:1]);"
                "print((i.IMAGE_DIR / i._recipe()['agent_source']).stat().st_size);"
                "print(k.CATALOG_PATH)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines()[0].startswith(str(tmp_path / "venv")), where.stdout
    assert str(ROOT) not in where.stdout

    kernels = run(str(bin_dir / "devdax-lab"), "kernels")
    assert kernels.returncode == 0, kernels.stderr
    names = [line.split()[0] for line in kernels.stdout.splitlines()[1:]]
    assert {"before", "after"} <= set(names), kernels.stdout

    doctor = run(str(bin_dir / "devdax-lab"), "doctor")
    assert doctor.returncode in (0, 2) and "Traceback" not in doctor.stderr, doctor.stderr
    assert "[ok  ] python: drgn: importable" in doctor.stdout, doctor.stdout
    assert "[ok  ] lab data files:" in doctor.stdout, doctor.stdout


def test_make_uses_an_activated_conda_environment_and_else_the_venv():
    import os
    import subprocess

    def python_of(**env):
        base = {k: v for k, v in os.environ.items() if not k.startswith("CONDA_")}
        out = subprocess.run(["make", "-n", "unit"], cwd=ROOT, env={**base, **env}, check=True,
                             capture_output=True, text=True).stdout
        return next(line.split()[0] for line in out.splitlines() if "-m pytest" in line)

    assert python_of() == ".venv/bin/python"
    assert python_of(CONDA_PREFIX="/opt/envs/lab", CONDA_DEFAULT_ENV="lab") == "/opt/envs/lab/bin/python"
    assert python_of(CONDA_PREFIX="/opt/conda", CONDA_DEFAULT_ENV="base") == ".venv/bin/python"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '"$CONDA_DEFAULT_ENV" != "base"' in setup and "--no-deps" in setup  # the same rule
