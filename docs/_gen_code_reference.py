"""Regenerate the code-derived parts of docs/errors.md and docs/logging.md:
python docs/_gen_code_reference.py   (``--check`` exits 1 when a page is stale)

The pages stay hand-written; only the regions between
``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->`` are
replaced. They are read from the code itself:

- the runtime error codes from ``LLMRuntimeError.CODES`` (a test checks that
  every code raised in ``src/``, explicitly or as a subclass's default code, is
  listed there, and nothing more);
- the HTTP error codes from the ``code="..."`` of the server's error calls;
- the log events from every ``log_event(logger, "name", level, **fields)`` call.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mongars_llm.errors import LLMRuntimeError

DOCS = Path(__file__).resolve().parent
SRC = DOCS.parent / "src" / "mongars_llm"

# What a reader needs beyond name, logger, level and fields (optional, per event).
EVENT_NOTES = {
    "provision": "one per role; WARNING when it failed",
    "llm_generate": "one per micro-batch",
    "llm_embed": "one per micro-batch",
    "llm_rerank": "one per micro-batch of rerank requests",
    "bundle_train_step": "every `logging_steps` optimizer steps, with the step's counts: "
    "`label_tokens` (sft), `rows` (embedding objectives), `masked_tokens` (mntp)",
    "bundle_eval": "with the evaluation metrics (`eval_loss`, `eval_perplexity`; `mrr@10`, ...; "
    "`mntp_loss`, `mntp_accuracy`)",
}


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def _constant(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _modules() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        dotted = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        found.append((dotted.removesuffix(".__init__"), ast.parse(path.read_text("utf-8"))))
    return found


# ------------------------------------------------------------------ error codes
def runtime_error_classes() -> dict[str, str]:
    """``LLMRuntimeError`` and its subclasses by name, with the code each raises by default."""
    found: dict[str, str] = {}
    stack: list[type[LLMRuntimeError]] = [LLMRuntimeError]
    while stack:
        cls = stack.pop()
        found[cls.__name__] = cls.default_code
        stack.extend(cls.__subclasses__())
    return found


def raised_runtime_codes() -> dict[str, set[str]]:
    """Runtime error codes used in the source: ``LLMRuntimeError(..., code="x")`` or a
    subclass given ``code="x"``; the default code of a subclass the source uses
    otherwise (raised, ``.wrap()``-ed, or handed on as an error factory, such as
    ``error=ModelLoadError`` or a table of classes) but does not merely catch or
    test (``except``, ``isinstance``); and string arguments of helpers whose name
    contains ``runtime_error``."""
    classes = runtime_error_classes()
    codes: dict[str, set[str]] = defaultdict(set)
    for module, tree in _modules():
        if module == "mongars_llm.errors":
            continue
        ignored: set[int] = set()  # names that only catch, test or carry an explicit code
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                ignored.update(id(n) for n in ast.walk(node.type))
            elif isinstance(node, ast.Call) and _call_name(node) in ("isinstance", "issubclass"):
                ignored.update(id(n) for a in node.args[1:] for n in ast.walk(a))
            elif isinstance(node, ast.Call) and _call_name(node) in classes:
                explicit = [_constant(k.value) for k in node.keywords if k.arg == "code"]
                if explicit and explicit[0]:
                    codes[explicit[0]].add(module)
                    ignored.add(id(node.func))
            elif isinstance(node, ast.Call) and "runtime_error" in _call_name(node):
                for argument in [*node.args, *(k.value for k in node.keywords)]:
                    code = _constant(argument)
                    if code and re.fullmatch(r"[a-z]+(_[a-z]+)+", code):
                        codes[code].add(module)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Name)
                and node.id in classes
                and node.id != "LLMRuntimeError"  # its default code is the catch-all
                and id(node) not in ignored
            ):
                codes[classes[node.id]].add(module)
    return codes


def http_error_codes() -> dict[str, set[int]]:
    """``code="x"`` of the server's error responses, with their HTTP status when literal."""
    codes: dict[str, set[int]] = defaultdict(set)
    for module, tree in _modules():
        if not module.startswith("mongars_llm.server"):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or _call_name(node) == "log_event":
                continue
            for keyword in node.keywords:
                code = _constant(keyword.value) if keyword.arg == "code" else None
                if not code:
                    continue
                statuses = [
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and type(a.value) is int
                ]
                codes[code].update(s for s in statuses if 100 <= s < 600)
    for code in LLMRuntimeError.CODES:  # runtime errors reach clients with their code
        codes.setdefault(code, set())
    stack: list[type[LLMRuntimeError]] = [LLMRuntimeError]
    while stack:  # ... and their class's status
        cls = stack.pop()
        codes[cls.default_code].add(cls.http_status)
        stack.extend(cls.__subclasses__())
    return codes


def render_runtime_codes() -> str:
    rows = ["| `LLMRuntimeError.code` | Meaning |", "| --- | --- |"]
    rows += [f"| `{code}` | {meaning} |" for code, meaning in LLMRuntimeError.CODES.items()]
    return "\n".join(rows)


def render_http_codes() -> str:
    rows = ["| `error.code` | HTTP status |", "| --- | --- |"]
    for code, statuses in sorted(http_error_codes().items()):
        shown = ", ".join(str(s) for s in sorted(statuses)) or "(from the error)"
        rows.append(f"| `{code}` | {shown} |")
    return "\n".join(rows)


# ------------------------------------------------------------------- log events
@dataclass
class Event:
    loggers: set[str] = field(default_factory=set)
    levels: set[str] = field(default_factory=set)
    fields: dict[str, None] = field(default_factory=dict)  # ordered set
    variable_fields: bool = False


def _logger_names(module: str, tree: ast.Module) -> dict[str, str]:
    """``name = logging.getLogger(...)`` assignments of a module."""
    names = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _call_name(node.value) == "getLogger"
        ):
            argument = node.value.args[0] if node.value.args else None
            logger = _constant(argument) or module
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = logger
    return names


def _dict_keys(scope: ast.AST, name: str) -> list[str] | None:
    """Keys of ``name = {"a": ...}`` (and ``name["b"] = ...``) in ``scope``; None if unknown."""
    keys: list[str] | None = None
    for node in ast.walk(scope):
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id == name:
                if not isinstance(value, ast.Dict):
                    return None
                keys = [k for k in map(_constant, value.keys) if k is not None]
            elif (
                isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Name)
                and target.value.id == name
                and _constant(target.slice)
                and keys is not None
            ):
                keys.append(str(_constant(target.slice)))
    return keys


def _calls_in_scopes(tree: ast.Module) -> list[tuple[ast.AST, ast.Call]]:
    """Every ``log_event`` call with its innermost enclosing function (or the module)."""
    found: list[tuple[ast.AST, ast.Call]] = []

    def visit(node: ast.AST, scope: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            if isinstance(child, ast.Call) and _call_name(child) == "log_event":
                found.append((scope, child))
            visit(child, inner)

    visit(tree, tree)
    return found


def log_events() -> dict[str, Event]:
    events: dict[str, Event] = defaultdict(Event)
    for module, tree in _modules():
        if module == "mongars_llm.logging":
            continue
        loggers = _logger_names(module, tree)
        for scope, node in _calls_in_scopes(tree):
            name = _constant(node.args[1]) if len(node.args) > 1 else None
            if name is None:
                continue
            event = events[name]
            target = node.args[0]
            event.loggers.add(
                loggers.get(target.id, module) if isinstance(target, ast.Name) else module
            )
            level = node.args[2] if len(node.args) > 2 else None
            for keyword in node.keywords:
                if keyword.arg == "level":
                    level = keyword.value
                elif keyword.arg is None:
                    keys = (
                        _dict_keys(scope, keyword.value.id)
                        if isinstance(keyword.value, ast.Name)
                        else None
                    )
                    if keys is None:
                        event.variable_fields = True
                    event.fields.update(dict.fromkeys(keys or ()))
                else:
                    event.fields[keyword.arg] = None
            found = re.findall(
                r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b", ast.unparse(level) if level else ""
            )
            event.levels.update(found or ["INFO"])
    return dict(events)


_LEVEL_ORDER = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def render_events() -> str:
    rows = ["| Event | Logger | Level | Fields | Notes |", "| --- | --- | --- | --- | --- |"]
    for name, event in sorted(log_events().items()):
        fields = ", ".join(f"`{f}`" for f in event.fields)
        if event.variable_fields:
            fields = f"{fields}, …" if fields else "…"
        levels = "/".join(sorted(event.levels, key=_LEVEL_ORDER.index))
        loggers = ", ".join(f"`{logger}`" for logger in sorted(event.loggers))
        rows.append(f"| `{name}` | {loggers} | {levels} | {fields} | {EVENT_NOTES.get(name, '')} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------ pages
REGIONS = {
    "errors.md": {
        "runtime-error-codes": render_runtime_codes,
        "http-error-codes": render_http_codes,
    },
    "logging.md": {"log-events": render_events},
}


def fill(text: str, name: str, body: str) -> str:
    pattern = re.compile(
        rf"(<!-- BEGIN generated: {re.escape(name)} [^>]*-->\n).*?(<!-- END generated: {re.escape(name)} -->)",
        re.DOTALL,
    )
    if not pattern.search(text):
        raise SystemExit(f"no generated region {name!r} in the page")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def render() -> dict[Path, str]:
    """Every page with its generated regions refreshed."""
    pages = {}
    for page, regions in REGIONS.items():
        path = DOCS / page
        text = path.read_text("utf-8")
        for name, build in regions.items():
            text = fill(text, name, build())
        pages[path] = text
    return pages


if __name__ == "__main__":
    stale = [path for path, text in render().items() if path.read_text("utf-8") != text]
    if "--check" in sys.argv:
        for path in stale:
            print(f"{path.name} is stale: run python docs/_gen_code_reference.py")
        sys.exit(1 if stale else 0)
    for path, text in render().items():
        path.write_text(text, "utf-8")
