"""The README contract: `.ci/run` runs the Quick start's test command verbatim, and the CLI answers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bdlens.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = _quick_start_commands()
    assert len(commands) == 2
    main_job, test_job = commands
    assert "install.sh main" in main_job and "pytest" in test_job
    assert test_job in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    paths = [[]]
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public walk
        for name, sub in action.choices.items():
            paths.append([name])
            for sub_action in getattr(sub, "_subparsers", None)._group_actions if sub._subparsers else []:  # noqa: SLF001
                paths.extend([name, child] for child in sub_action.choices)
    assert ["world", "build"] in paths and ["train", "deterministic"] in paths and ["evaluate"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: bdlens" in capsys.readouterr().out


def test_version_and_nonsense_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "bdlens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["world", "build", "--no-such-flag"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
