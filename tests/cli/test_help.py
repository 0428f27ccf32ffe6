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


def test_bundle_build_flags_are_the_config_fields_with_their_defaults_shown() -> None:
    """Each ``bundle build`` flag sets the BundleConfig field of its name; one not given
    parses as unset, so a --config file's value (else the field's default) stays."""
    from mongars_llm.training import BundleConfig

    (build,) = [parser for path, parser in COMMANDS if path == ("bundle", "build")]
    cli_only = {"help", "config", "json", "no_register"}
    for action in build._actions:
        if action.dest in cli_only:
            continue
        assert action.dest in BundleConfig.model_fields, action.dest
        assert action.option_strings == ["--" + action.dest.replace("_", "-")]
        assert action.default in (None, False), action.dest
    text = " ".join(build.format_help().split())
    assert "LoRA rank (default: 8; 16 for the embedding objectives)" in text
    assert "--lr-scheduler {linear,cosine,constant,constant_with_warmup}" in text
    assert "learning-rate schedule (default: linear; constant for the embedding objectives)" in text
    assert (
        "--eval-dataset-split EVAL_DATASET_SPLIT split of --eval-dataset-id (default: validation)"
        in text
    )
    assert "(80% masked, 10% random, 10% kept) (default: 0.2)" in text
