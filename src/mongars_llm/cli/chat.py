"""``mongars-llm chat [ROLE]``: talk to a role's model in the terminal, like ``ollama run``.

Replies stream as they are generated. ``/bye`` (or end of input, Ctrl+D) leaves,
``/clear`` forgets the conversation, ``/?`` lists the commands. ``--prompt TEXT``
answers once and exits (``-`` reads the prompt from stdin).

When a ``mongars-llm serve`` answers at ``MONGARS_HOST`` the chat goes through
its ``/api/chat`` (:mod:`._remote`: no second copy of the model, no load time);
``--local`` loads the model in this process instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputTooLongError, LLMRuntimeError
from ._output import print_json, terminal_safe, valid_text
from ._remote import Server, connect
from ._runtime import add_runtime_arguments, plan_runtime, sampling_error

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
  mongars-llm chat --adapter support        an adapter `bundle build` registered
  mongars-llm chat --local                  load in this process even if a server runs

A `mongars-llm serve` answering at MONGARS_HOST (default http://127.0.0.1:8000) is used
instead of loading the model (--model, --manifest, --profile, --device force a local load).

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
        "--json",
        action="store_true",
        help="with --prompt: print the reply as one JSON document (text, finish_reason, usage)",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(handler=_run)


#: the flag that sets each sampling argument, for usage errors
FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given, checked before the model loads (a usage error, exit 2)."""
    from ..errors import InvalidInputError
    from ..runtime import SamplingParams

    options = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    try:
        SamplingParams(**options)
    except InvalidInputError as err:
        raise sampling_error(err, FLAGS) from err
    return options


def _read_prompt(args: argparse.Namespace) -> str | None:
    if args.prompt is None:
        return None
    if args.prompt != "-":
        return valid_text(args.prompt, "--prompt")
    prompt = valid_text(sys.stdin.read(), "--prompt -: stdin").strip()
    if not prompt:
        raise ConfigError("--prompt -: stdin was empty; pipe the prompt in")
    return prompt


def _run(args: argparse.Namespace) -> int:
    if args.json and args.prompt is None:
        raise ConfigError("--json needs --prompt (the interactive chat prints text)")
    if args.system is not None:
        valid_text(args.system, "--system")
    options = _options(args)
    _tolerant_stdin()
    prompt = _read_prompt(args)
    server = connect(args)
    if server is not None:
        return _run_remote(server, args, prompt, options)
    plan = plan_runtime(args, args.role, PREFERRED_ROLES, kind="generate")
    if plan.role is not None:
        options["role"] = plan.role
    if plan.adapter is not None:
        options["adapter"] = plan.adapter.name
    runtime = plan.load()
    with runtime:
        system = [{"role": "system", "content": args.system}] if args.system else []
        if prompt is not None:
            return _one_shot(runtime, [*system, _user(prompt)], options, json_output=args.json)
        return _interactive(runtime, system, options, plan.description)


def _run_remote(
    server: Server, args: argparse.Namespace, prompt: str | None, options: dict[str, Any]
) -> int:
    """The chat through a running server (same flows, the server's runtime)."""
    role = args.role or _server_role(server)
    model = f"{role}:{args.adapter}" if args.adapter else role
    runtime: Any = RemoteChat(server, model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if prompt is not None:
        return _one_shot(runtime, [*system, _user(prompt)], options, json_output=args.json)
    return _interactive(runtime, system, options, server.describe(model))


def _server_role(server: Server) -> str:
    """The server's chat role: 'general' (else 'chat', else its first)."""
    names = [m.get("name", "") for m in server.get("/api/tags").get("models", [])]
    roles = [n for n in names if n and ":" not in n]
    for preferred in PREFERRED_ROLES:
        if preferred in roles:
            return preferred
    if not roles:
        raise ConfigError(f"the server at {server.url} lists no models; check its manifest")
    return roles[0]


class RemoteChat:
    """What the chat flows need of a runtime (``generate``, ``stream``), answered by a
    running server's ``/api/chat``."""

    device = ""
    engine = None  # the server's own

    def __init__(self, server: Server, model: str) -> None:
        self.server = server
        self.model = model

    def _body(self, messages: list[dict[str, str]], options: dict[str, Any], stream: bool) -> Any:
        names = {"max_new_tokens": "num_predict", "temperature": "temperature"}
        names |= {"top_p": "top_p", "seed": "seed"}
        sampling = {names[k]: v for k, v in options.items() if k in names}
        return {"model": self.model, "messages": messages, "stream": stream, "options": sampling}

    def generate(self, messages: list[dict[str, str]], **options: Any) -> Any:
        from ..runtime import Generation, Usage

        answer = self.server.post("/api/chat", self._body(messages, options, False))
        prompt, completion = answer.get("prompt_eval_count", 0), answer.get("eval_count", 0)
        return Generation(
            text=answer["message"]["content"],
            finish_reason=answer.get("done_reason", "stop"),
            usage=Usage(prompt, completion, prompt + completion),
        )

    def stream(self, messages: list[dict[str, str]], **options: Any) -> RemoteStream:
        return RemoteStream(self.server.stream("/api/chat", self._body(messages, options, True)))


class RemoteStream:
    """The text deltas of a streamed server reply; :meth:`cancel` hangs up."""

    def __init__(self, parts: Any) -> None:
        self._parts = parts
        self._cancelled = False

    def __iter__(self) -> Any:
        if self._cancelled:
            return
        for part in self._parts:
            if self._cancelled:
                return
            text = part.get("message", {}).get("content", "")
            if text:
                yield text

    def cancel(self) -> None:
        self._cancelled = True
        self._parts.close()


def _tolerant_stdin() -> None:
    """Read bytes that are not UTF-8 as lone surrogates (then refused with one clear
    line) instead of a ``UnicodeDecodeError`` traceback under a strict locale."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


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
                **({"engine": runtime.engine} if runtime.engine else {}),
            }
        )
        return EXIT_OK
    _stream_reply(runtime, messages, options, stop_only_the_reply=False)
    return EXIT_OK


def _stream_reply(
    runtime: UnifiedLLMRuntime,
    messages: list[dict[str, str]],
    options: dict[str, Any],
    *,
    stop_only_the_reply: bool = True,
) -> str:
    """Print the reply as it streams. Ctrl+C stops this reply only in the interactive
    chat; a one-shot reply is interrupted as a whole (exit 130)."""
    stream = runtime.stream(messages, **options)
    parts: list[str] = []
    try:
        for delta in stream:
            parts.append(delta)
            sys.stdout.write(terminal_safe(delta))
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        for _ in stream:  # let the worker finish this reply before the next one
            pass
        if not stop_only_the_reply:
            raise
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
    runtime: UnifiedLLMRuntime,
    system: list[dict[str, str]],
    options: dict[str, Any],
    description: str,
) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        where = description
        if runtime.device:  # in-process; a server's device and engine are its own
            where = f"{description} on {runtime.device} ({runtime.engine} engine)"
        print(terminal_safe(f"{where}. /bye to leave, /? for help."))
    history: list[dict[str, str]] = []
    while True:
        line = _read_line(interactive)
        if line is None:
            return EXIT_OK
        text = line.strip()
        if not text:
            continue
        try:
            valid_text(text, "this line")
        except ConfigError as err:
            print(f"mongars-llm: error: {err}", file=sys.stderr, flush=True)
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
                print(
                    terminal_safe(f"unknown command {command}; /? lists the commands", sys.stderr),
                    file=sys.stderr,
                )
            continue
        history.append(_user(text))
        try:
            reply = _stream_reply(runtime, system + history, options)
        except LLMRuntimeError as err:
            history.pop()
            hint = (
                " (/clear starts a new conversation)" if isinstance(err, InputTooLongError) else ""
            )
            print(f"mongars-llm: error: {err}{hint}", file=sys.stderr, flush=True)
            continue
        history.append({"role": "assistant", "content": reply})
        if interactive:
            print()
