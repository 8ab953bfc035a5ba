"""The dataclass → argparse bridge of tinyllm/cli.py."""

from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass, field

import pytest

from tinyllm import cli


@dataclass
class EchoConfig:
    name: str = field(default="x", metadata={"help": "a name"})
    count: int = 1
    ratio: float = 0.5
    verbose: bool = False
    mode: str = field(default="a", metadata={"choices": ["a", "b"]})
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count={self.count} must be >= 0")


def run_echo(cfg: EchoConfig) -> int:
    print(dataclasses.asdict(cfg))
    return 0


@pytest.fixture
def echo_command(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("echo_mod")
    mod.EchoConfig = EchoConfig
    mod.run_echo = run_echo
    monkeypatch.setitem(sys.modules, "echo_mod", mod)
    monkeypatch.setitem(cli.COMMANDS, "echo", "echo_mod:EchoConfig:run_echo")
    monkeypatch.setitem(cli.COMMANDS, "grp sub", "echo_mod:EchoConfig:run_echo")


def test_flags_parse_into_the_dataclass(echo_command, capsys) -> None:
    assert cli.main(["echo", "--name", "y", "--count", "3", "--ratio", "0.25", "--verbose", "--mode", "b",
                     "--limit", "7"]) == 0
    out = capsys.readouterr().out
    assert "'name': 'y'" in out and "'count': 3" in out and "'ratio': 0.25" in out
    assert "'verbose': True" in out and "'mode': 'b'" in out and "'limit': 7" in out


def test_defaults_and_subcommands(echo_command, capsys) -> None:
    assert cli.main(["grp", "sub"]) == 0
    assert "'count': 1" in capsys.readouterr().out


def test_toml_config_then_flags_override(echo_command, tmp_path, capsys) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('name = "from-file"\ncount = 5\n')
    cli.main(["echo", "--config", str(conf), "--count", "6"])
    out = capsys.readouterr().out
    assert "'name': 'from-file'" in out and "'count': 6" in out


def test_bad_values_exit_with_a_message(echo_command, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["echo", "--count", "-1"])
    assert "count=-1" in str(e.value)
    with pytest.raises(SystemExit):
        cli.main(["echo", "--mode", "c"])
    assert "invalid choice" in capsys.readouterr().err
    conf = tmp_path / "c.toml"
    conf.write_text("nope = 1\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["echo", "--config", str(conf)])
    assert "nope" in str(e.value)


def test_unknown_command_and_help(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    assert "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 0
    assert "generate" in capsys.readouterr().out
