"""Every command's ``--help`` shows examples, and the choices of its options."""

from __future__ import annotations

import argparse

import pytest

from mongars_llm.cli import build_parser

# `models` is documented by its own module's tests
SKIP = {"models"}


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if (*path, name)[0] in SKIP:
                    continue
                found.append(((*path, name), sub))
                found.extend(_commands(sub, (*path, name)))
    return found


COMMANDS = _commands(build_parser())


def test_the_new_commands_are_registered() -> None:
    names = {path for path, _ in COMMANDS}
    assert {("chat",), ("embed",), ("serve",), ("doctor",)} <= names


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_has_examples_and_choices(path: tuple[str, ...], parser) -> None:
    text = parser.format_help()
    assert "examples:" in text and f"mongars-llm {path[0]}" in text.split("examples:")[1]
    for action in parser._actions:
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            assert all(str(choice) in text for choice in action.choices), action.dest
