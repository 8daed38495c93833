"""Every command the CLI lists exists and answers --help; unknown commands are refused."""
from __future__ import annotations

import pytest

from rlhflab.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_listed_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"rlhflab {name}" in capsys.readouterr().out


def test_unknown_command_and_bad_override_form(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sft", "stray-argument"])
    assert e.value.code == 2
