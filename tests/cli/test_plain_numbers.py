"""Every integer and float option of every command reads a number as a config file or `--set` does (YAML 1.2's
plain scalars): digits 0-9 and an optional sign; `1_0` (Python's digit grouping), padded or fullwidth digits and
`2.0` for an integer are refused when the command line is parsed, before any work. The options are found by walking
the commands, so an option added later is covered without being listed here."""

from __future__ import annotations

import pytest
import typer.main

from okdpipe.cli import app
from tests.cli.test_conventions import okdpipe

try:
    from typer._click.exceptions import UsageError  # typer >= 0.25 vendors its own click
except ImportError:
    from click.exceptions import UsageError


def number_options() -> list[tuple[str, str, type]]:
    """(command, flag, int or float) for every numeric option of every command."""
    found = []
    for name, command in sorted(typer.main.get_command(app).commands.items()):
        for param in command.params:
            kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            if kind in (int, float) and param.opts and param.opts[0].startswith("--"):
                found.append((name, param.opts[0], kind))
    return found


OPTIONS = number_options()


def test_the_walk_finds_the_numeric_options_of_every_stage():
    """The control: the walk sees the options this file is about (a change in the CLI library could hide them)."""
    assert {("distill", "--epochs", int), ("distill", "--lr", float), ("serve", "--port", int)} <= set(OPTIONS)
    assert {name for name, _, _ in OPTIONS} >= {"distill", "select", "export", "bench", "serve"}


@pytest.mark.parametrize(("command", "flag", "kind"), OPTIONS, ids=[f"{c} {f}" for c, f, _ in OPTIONS])
@pytest.mark.parametrize("value", ["1_0", " 7", "７", "1e"], ids=["grouped", "padded", "fullwidth", "cut"])
def test_a_number_that_is_not_plain_is_refused_by_every_option(command, flag, kind, value):
    click_command = typer.main.get_command(app).commands[command]
    with pytest.raises(UsageError) as refused:  # parsing only: a value let through never starts the command
        click_command.make_context(command, [flag, value])
    noun = "integer" if kind is int else "number"
    assert f"{value!r} is not a plain {noun}" in refused.value.format_message()


@pytest.mark.parametrize(("command", "flag", "kind"), OPTIONS, ids=[f"{c} {f}" for c, f, _ in OPTIONS])
def test_plain_numbers_parse_to_their_value_and_an_integer_option_refuses_a_decimal_point(command, flag, kind):
    click_command = typer.main.get_command(app).commands[command]
    if kind is int:
        with pytest.raises(UsageError, match="'2.0' is not a plain integer"):
            click_command.make_context(command, [flag, "2.0"])
    plain = {"3": 3, "-12": -12, "+7": 7} if kind is int else {"3": 3.0, "-0.5": -0.5, ".5": 0.5, "5e-4": 5e-4}
    param = next(p for p in click_command.params if p.opts and p.opts[0] == flag)
    for text, value in plain.items():  # parsing only (resilient: no run, missing arguments allowed)
        context = click_command.make_context(command, [flag, text], resilient_parsing=True)
        assert context.params[param.name] == value and type(context.params[param.name]) is kind


def test_the_refusal_is_one_line_and_exit_2_from_the_console():
    done = okdpipe("distill", "--epochs", "1_0", "--dry-run")
    assert done.returncode == 2
    assert done.stderr == (
        "error: Invalid value for '--epochs': '1_0' is not a plain integer (e.g. 42 or -3); "
        "see `okdpipe distill --help`\n"
    )
