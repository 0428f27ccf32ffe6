"""``mongars-llm chat [ROLE]``: talk to a role's model in the terminal, like ``ollama run``.

Replies stream as they are generated. ``/bye`` (or end of input, Ctrl+D) leaves,
``/clear`` forgets the conversation, ``/?`` lists the commands. ``--prompt TEXT``
answers once and exits (``-`` reads the prompt from stdin).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import LLMRuntimeError
from ._output import print_json
from ._runtime import add_runtime_arguments, load_runtime

if TYPE_CHECKING:
    from ..runtime import UnifiedLLMRuntime

__all__ = ["register"]

EXIT_OK, EXIT_FAILED = 0, 1
PREFERRED_ROLES = ("general", "chat")

HELP = """commands:
  /bye     leave (so does Ctrl+D, end of input)
  /clear   forget the conversation so far
  /?       this help"""

EPILOG = """examples:
  mongars-llm chat                          talk to the active profile's 'general' role
  mongars-llm chat coding --profile small   another role and profile
  mongars-llm chat --prompt "Say hi"        one reply, then exit
  echo "Say hi" | mongars-llm chat --prompt -
  mongars-llm chat --model ./my-checkpoint  a checkpoint folder or Hub id instead of a role

In the chat, /bye (or Ctrl+D) leaves, /clear forgets the conversation, /? lists commands.
Sampling defaults come from the role (mongars-llm models show ROLE); flags win."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a role's model in the terminal (streaming), or answer one --prompt",
        description="Chat with a role's model in the terminal: replies stream as they are "
        "generated. The role is provisioned first if its weights are not on disk.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "role",
        nargs="?",
        metavar="ROLE",
        help="manifest role (default: 'general', else the profile's first role)",
    )
    parser.add_argument(
        "--prompt",
        metavar="TEXT",
        help="answer this one prompt and exit ('-' reads it from stdin)",
    )
    parser.add_argument("--system", metavar="TEXT", help="system message for the conversation")
    sampling = parser.add_argument_group("sampling (default: the role's parameters)")
    sampling.add_argument("--max-new-tokens", type=int, metavar="N", help="reply length limit")
    sampling.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    sampling.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling")
    sampling.add_argument("--seed", type=int, metavar="N", help="reproducible sampling")
    parser.add_argument(
        "--adapter", metavar="NAME", help="LoRA adapter to use (default: the role's)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --prompt: print the reply as one JSON document (text, finish_reason, usage)",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(handler=_run)


def _options(args: argparse.Namespace, role: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "role": role,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "adapter": args.adapter,
    }
    return {key: value for key, value in options.items() if value is not None}


def _run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.json and args.prompt is None:
        raise ConfigError("--json needs --prompt (the interactive chat prints text)")
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ConfigError("--prompt -: stdin was empty; pipe the prompt in")
    runtime, role = load_runtime(args, args.role, PREFERRED_ROLES)
    with runtime:
        options = _options(args, role)
        system = [{"role": "system", "content": args.system}] if args.system else []
        if prompt is not None:
            return _one_shot(runtime, [*system, _user(prompt)], options, json_output=args.json)
        return _interactive(runtime, system, options)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _one_shot(
    runtime: UnifiedLLMRuntime,
    messages: list[dict[str, str]],
    options: dict[str, Any],
    *,
    json_output: bool,
) -> int:
    if json_output:
        reply = runtime.generate(messages, **options)
        print_json(
            {
                "text": reply.text,
                "finish_reason": reply.finish_reason,
                "usage": reply.usage.to_dict(),
            }
        )
        return EXIT_OK
    _stream_reply(runtime, messages, options)
    return EXIT_OK


def _stream_reply(
    runtime: UnifiedLLMRuntime, messages: list[dict[str, str]], options: dict[str, Any]
) -> str:
    """Print the reply as it streams; Ctrl+C stops this reply only."""
    stream = runtime.stream(messages, **options)
    parts: list[str] = []
    try:
        for delta in stream:
            parts.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        for _ in stream:  # let the worker finish this reply before the next one
            pass
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def _read_line(interactive: bool) -> str | None:
    """One line from the user; ``None`` at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line if line else None


def _interactive(
    runtime: UnifiedLLMRuntime, system: list[dict[str, str]], options: dict[str, Any]
) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{runtime.model_id} on {runtime.device}. /bye to leave, /? for help.")
    history: list[dict[str, str]] = []
    while True:
        line = _read_line(interactive)
        if line is None:
            return EXIT_OK
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/bye", "/exit", "/quit"):
                return EXIT_OK
            if command == "/clear":
                history.clear()
                print("(conversation cleared)", file=sys.stderr, flush=True)
            elif command in ("/?", "/help"):
                print(HELP, flush=True)
            else:
                print(f"unknown command {command}; /? lists the commands", file=sys.stderr)
            continue
        history.append(_user(text))
        try:
            reply = _stream_reply(runtime, system + history, options)
        except LLMRuntimeError as err:
            history.pop()
            hint = " (/clear starts a new conversation)" if err.code == "input_too_long" else ""
            print(f"mongars-llm: error: {err}{hint}", file=sys.stderr, flush=True)
            continue
        history.append({"role": "assistant", "content": reply})
        if interactive:
            print()
