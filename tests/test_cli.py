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


def test_boolean_flags_take_a_value_or_a_no_form(echo_command, capsys) -> None:
    for argv, want in ((["--verbose", "false"], False), (["--verbose", "yes"], True), (["--no-verbose"], False),
                       (["--verbose", "--no-verbose"], False), (["--no-verbose", "--verbose"], True)):
        assert cli.main(["echo", *argv]) == 0
        assert f"'verbose': {want}" in capsys.readouterr().out


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
    assert cli.main(["echo", "--count", "-1"]) == 2
    assert capsys.readouterr().err == "tinyllm echo: error: count=-1 must be >= 0\n"
    with pytest.raises(SystemExit):  # argparse's own checks keep argparse's usage message and exit status 2
        cli.main(["echo", "--mode", "c"])
    assert "invalid choice" in capsys.readouterr().err
    conf = tmp_path / "c.toml"
    conf.write_text("nope = 1\n")
    assert cli.main(["echo", "--config", str(conf)]) == 2
    assert "nope" in capsys.readouterr().err
    conf.write_text("count = [1\n")
    assert cli.main(["echo", "--config", str(conf)]) == 2
    assert f"--config {conf}: not valid TOML" in capsys.readouterr().err
    assert cli.main(["echo", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: no such file or directory" in capsys.readouterr().err


def test_user_errors_are_one_line_and_debug_keeps_the_traceback(monkeypatch, tmp_path, capsys) -> None:
    """ValueError / OSError / a SystemExit message from a command print `tinyllm <cmd>: error: ...` and
    return 2; --debug and TINYLLM_DEBUG=1 re-raise; any other exception is a bug and propagates."""
    raised: list[BaseException] = []

    def run_fail(cfg: EchoConfig) -> int:
        raise raised[-1]

    mod = types.ModuleType("fail_mod")
    mod.EchoConfig, mod.run_fail = EchoConfig, run_fail
    monkeypatch.setitem(sys.modules, "fail_mod", mod)
    monkeypatch.setitem(cli.COMMANDS, "fail", "fail_mod:EchoConfig:run_fail")
    missing = tmp_path / "nope.bin"
    cases = [(ValueError("x.json: not valid JSON\n(line 1)"), "x.json: not valid JSON (line 1)"),
             (FileNotFoundError(2, "No such file or directory", str(missing)), f"{missing}: no such file or directory"),
             (SystemExit("error: --store s holds no store"), "--store s holds no store")]
    for exc, message in cases:
        raised.append(exc)
        assert cli.main(["fail"]) == 2
        assert capsys.readouterr().err == f"tinyllm fail: error: {message}\n"
    with pytest.raises(SystemExit):
        cli.main(["fail", "--debug"])
    raised.append(ValueError("bad"))
    monkeypatch.setenv("TINYLLM_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        cli.main(["fail"])
    monkeypatch.delenv("TINYLLM_DEBUG")
    raised.append(KeyError("bug"))
    with pytest.raises(KeyError):
        cli.main(["fail"])
    raised.append(SystemExit(3))  # a bare exit status passes through
    with pytest.raises(SystemExit) as e:
        cli.main(["fail"])
    assert e.value.code == 3


def test_unknown_command_and_help(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    assert "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 0
    assert "generate" in capsys.readouterr().out
