"""Every command explains itself: a description, help for every option and
an example (issue 15 item 6)."""

import argparse
import subprocess
import sys

import pytest

from lab import cli


def _commands(parser, path=()):
    """(path, parser) of every subcommand, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(cli.build_parser()))


def test_the_top_level_help_says_what_the_tool_is():
    text = cli.build_parser().format_help()
    assert "boots real Debian kernels" in text and "drgn" in text
    assert "``" not in text  # no reST markup
    assert text.rstrip().endswith("describes each command.")  # not cut mid-sentence
    assert "--version" in text and "--verbose" in text and "--quiet" in text


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_a_description_option_help_and_an_example(path, parser):
    assert parser.description and len(parser.description) > 40, path
    assert "``" not in parser.description
    assert parser.epilog and parser.epilog.startswith("example"), path
    assert f"devdax-lab {' '.join(path)}" in parser.epilog, parser.epilog
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"devdax-lab {' '.join(path)}: {action.dest} has no help"
    parser.format_help()  # formats without an error


def test_every_command_is_covered():
    assert {p[0] for p, _ in COMMANDS} >= {"kernels", "fetch", "boot", "run", "compare", "doctor"}


def test_version_quiet_and_verbose(tmp_path, monkeypatch, capsys):
    out = subprocess.run([sys.executable, "-m", "lab.cli", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("devdax-lab ") and out.split()[1][0].isdigit()
    monkeypatch.setenv("DEVDAX_LAB_CACHE", str(tmp_path))
    assert cli.main(["-q", "fetch", "middle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("devdax-lab: unknown kernel 'middle'") and "built: none yet" in err
    assert "Traceback" not in err
    import logging

    configured = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: configured.append(kw["level"]))
    assert cli.main(["-v", "fetch", "middle"]) == 2  # the same line, after the traceback
    assert configured == [logging.DEBUG]
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("devdax-lab: unknown kernel")
    from lab import progress

    progress.set_quiet(False)
