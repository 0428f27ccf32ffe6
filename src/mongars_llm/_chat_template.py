"""Chat templates rendered with bounds: a model file cannot freeze or exhaust the process.

A chat template is code that ships with the model (a GGUF's metadata, a
checkpoint's ``tokenizer_config.json`` or ``chat_template.jinja``). Jinja's
sandbox blocks escapes, not time or memory: ``{{ 'x' * 1000000000 }}`` or two
nested ``range(100000)`` loops would hold a worker for hours and take gigabytes.
:func:`render_chat_template` renders in the environment transformers'
``apply_chat_template`` uses (``trim_blocks``, ``lstrip_blocks``, the
``loopcontrols`` extension and ``{% generation %}`` tag, ``tojson``,
``raise_exception``, ``strftime_now``, ``dict``, ``namespace``; the same
variables: ``messages``, ``add_generation_prompt``, the tokenizer's special
tokens), so a working template renders the same text, with these bounds:

* a **deadline** (:data:`RENDER_TIMEOUT_S`): a watchdog interrupts the rendering
  thread when it passes (and the sandbox's call/attribute hooks check it too);
* a **size cap** on every value the template builds and on its output (at least
  :data:`MIN_RENDER_CHARS` characters, more for long conversations): string and
  list repetition, concatenation, padding and format widths are checked *before*
  the value is allocated;
* endless recursion (a macro calling itself) is caught.

Whatever goes wrong is one :class:`ChatTemplateError` ("the model's chat
template is broken: …; fix: …"), including syntax errors; a template that
refuses the messages itself (``raise_exception``) is ``refused=True``: the
caller's input, not the template, is at fault. :func:`check_chat_template`
test-renders a template with a short sample conversation: provisioning runs it
when a GGUF is converted, the runtime when a model is loaded.

Standard library only at import time (Jinja is imported when a template is
compiled), so every layer may use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

__all__ = [
    "MIN_RENDER_CHARS",
    "RENDER_TIMEOUT_S",
    "ChatTemplateError",
    "check_chat_template",
    "render_chat_template",
]

#: longest a chat template may render one conversation for
RENDER_TIMEOUT_S = 5.0
#: the size cap on values and output, for conversations shorter than half of it
MIN_RENDER_CHARS = 1_000_000
#: integers above this many bits are refused (``9 ** 9 ** 9`` would compute for minutes)
_MAX_INT_BITS = 4096
#: a run of this many digits in a format string is a width no prompt needs
_HUGE_WIDTH = re.compile(r"\d{7,}")

_FIX = (
    "fix: give the model a working chat template (chat_template.jinja or the "
    "'chat_template' of tokenizer_config.json), or send a prompt string instead of messages"
)


class ChatTemplateError(ValueError):
    """A chat template that cannot render (``refused``: it refused these messages itself)."""

    def __init__(self, message: str, *, refused: bool = False, reason: str = "") -> None:
        super().__init__(message)
        self.refused = refused
        #: what is wrong, without the fix (for callers that word the fix for their case)
        self.reason = reason or message


def _broken(reason: str) -> ChatTemplateError:
    return ChatTemplateError(
        f"the model's chat template is broken: {reason}; {_FIX}", reason=reason
    )


class _Refusal(Exception):
    """``raise_exception(...)`` called by the template: it refuses the input."""


class _Timeout(BaseException):
    """Raised inside the rendering thread by the watchdog (never caught by template code)."""


class _Budget:
    """The bounds of one rendering (kept in a context variable: templates are shared)."""

    def __init__(self, timeout_s: float, max_chars: int) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.max_chars = max_chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Timeout

    def check_size(self, value: Any) -> None:
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > self.max_chars:
            raise _TooLarge(len(value), self.max_chars)
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            raise _TooLarge(value.bit_length(), _MAX_INT_BITS, unit="bits")

    def check_result_length(self, length: int) -> None:
        if length > self.max_chars:
            raise _TooLarge(length, self.max_chars)


class _TooLarge(Exception):
    def __init__(self, size: int, limit: int, *, unit: str = "characters") -> None:
        super().__init__(f"it builds a value of {size} {unit}, more than the limit of {limit}")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "mongars_chat_template_budget", default=None
)


def _budget() -> _Budget | None:
    return _BUDGET.get()


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would pass the bounds, before computing it."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            n = _length(seq)
            if n is not None and isinstance(times, int) and not isinstance(times, bool):
                budget.check_result_length(n * max(times, 0))
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > _MAX_INT_BITS:
                raise _TooLarge(bits, _MAX_INT_BITS, unit="bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            bits = left.bit_length() * right
            if bits > _MAX_INT_BITS:
                raise _TooLarge(bits, _MAX_INT_BITS, unit="bits")
    elif operator == "%":
        width = _HUGE_WIDTH.search(left) if isinstance(left, str) else None
        if width:
            raise _TooLarge(int(width.group()), budget.max_chars)
    elif operator == "+":
        a, b = _length(left), _length(right)
        if a is not None and b is not None:
            budget.check_result_length(a + b)


def _check_arguments(
    budget: _Budget, obj: Any, args: Sequence[Any], kwargs: Mapping[str, Any], fmt: Any = None
) -> None:
    """Widths, counts and values passed to calls and filters (``'x'.ljust(10**9)``,
    ``'x'|center(10**9)``, ``'{:>1000000000}'.format(x)``) stay within the bounds."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and value > budget.max_chars:
            raise _TooLarge(value, budget.max_chars)
        budget.check_size(value)
    if fmt is None and getattr(obj, "__name__", "") in ("format", "format_map"):
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        fmt = getattr(method, "__self__", None)
    width = _HUGE_WIDTH.search(fmt) if isinstance(fmt, str) else None
    if width:
        raise _TooLarge(int(width.group()), budget.max_chars)


@functools.lru_cache(maxsize=1)
def _environment_class() -> Any:
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}…{% endgeneration %}`` (transformers' assistant-mask tag):
        renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller: Any) -> str:
            return str(caller())

    class BoundedEnvironment(ImmutableSandboxedEnvironment):  # type: ignore[misc]
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget()
            if budget is not None:
                budget.tick()
                _check_binop(budget, operator, left, right)
            result = super().call_binop(context, operator, left, right)
            if budget is not None:
                budget.check_size(result)
            return result

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            budget = _budget()
            if budget is not None:
                budget.tick()
                _check_arguments(budget, __obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            if budget is not None:
                budget.check_size(result)
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            budget = _budget()
            if budget is not None:
                budget.tick()
            result = super().getattr(obj, attribute)
            if budget is not None:
                budget.check_size(result)
            return result

        def getitem(self, obj: Any, argument: Any) -> Any:
            budget = _budget()
            if budget is not None:
                budget.tick()
            result = super().getitem(obj, argument)
            if budget is not None:
                budget.check_size(result)
            return result

    return BoundedEnvironment, GenerationTag


def _passes_first(function: Any) -> bool:
    """Whether jinja passes the context, eval context or environment before the value."""
    return getattr(function, "jinja_pass_arg", None) is not None


def _bounded_filter(function: Any) -> Any:
    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if budget is not None:
            budget.tick()
            value, rest = (args[1], args[2:]) if _passes_first(function) else (args[0], args[1:])
            fmt = value if function.__name__ == "do_format" else None
            _check_arguments(budget, function, rest, kwargs, fmt)
        result = function(*args, **kwargs)
        if budget is not None:
            budget.check_size(result)
        return result

    return bounded


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    """The compiled template (cached: a server renders the same one for every request)."""
    import jinja2
    import jinja2.ext

    environment_class, generation_tag = _environment_class()
    env = environment_class(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[generation_tag, jinja2.ext.loopcontrols],
    )

    def raise_exception(message: str) -> None:
        raise _Refusal(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateNamespace(jinja2.utils.Namespace):  # type: ignore[misc]
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a namespace attribute cannot start with '_' ({name!r})"
                )

    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    env.globals["namespace"] = TemplateNamespace
    # jinja folds constant expressions while compiling: bounded too (a folding that
    # fails the bounds is left to the rendering, which refuses it)
    token = _BUDGET.set(_Budget(RENDER_TIMEOUT_S, MIN_RENDER_CHARS))
    try:
        with _watchdog(RENDER_TIMEOUT_S):
            return env.from_string(source)
    except _Timeout:
        raise _broken(f"compiling it took more than {RENDER_TIMEOUT_S:g} s") from None
    except jinja2.TemplateSyntaxError as err:
        raise _broken(f"a syntax error on line {err.lineno}: {err.message}") from err
    except (jinja2.TemplateError, RecursionError, MemoryError) as err:
        raise _broken(f"it does not compile ({type(err).__name__}: {err})") from err
    finally:
        _BUDGET.reset(token)


# ---------------------------------------------------------------- the watchdog
_set_async_exc = getattr(ctypes, "pythonapi", None) and ctypes.pythonapi.PyThreadState_SetAsyncExc


@contextlib.contextmanager
def _watchdog(timeout_s: float) -> Iterator[None]:
    """Raise :class:`_Timeout` in this thread once ``timeout_s`` has passed, even in a
    loop that calls nothing the sandbox sees (``{% for a in x %}{% for b in x %}``)."""
    if not _set_async_exc:  # not CPython: the sandbox hooks still check the deadline
        yield
        return
    thread_id = threading.get_ident()
    lock = threading.Lock()
    done = False

    def interrupt() -> None:
        with lock:
            if not done:
                _set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(_Timeout))

    timer = threading.Timer(timeout_s, interrupt)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            done = True
            _set_async_exc(ctypes.c_ulong(thread_id), None)  # drop one not yet delivered


# ---------------------------------------------------------------- rendering
def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    timeout_s: float = RENDER_TIMEOUT_S,
    max_chars: int | None = None,
    **variables: Any,
) -> str:
    """Render ``messages`` with ``template`` within the bounds (see the module docstring).

    ``variables`` are the other names the template sees (the tokenizer's special
    tokens: ``bos_token``, ``eos_token``, …). ``max_chars`` defaults to twice
    the conversation's characters, at least :data:`MIN_RENDER_CHARS`. Raises
    :class:`ChatTemplateError`.
    """
    import jinja2

    if max_chars is None:
        size = sum(len(str(m.get("content") or "")) for m in messages)
        max_chars = max(MIN_RENDER_CHARS, 2 * size)
    compiled = _compile(template)
    # drop keys whose value is None, as transformers does (templates test for absent keys)
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    budget = _Budget(timeout_s, max_chars)
    token = _BUDGET.set(budget)
    pieces: list[str] = []
    try:
        with _watchdog(timeout_s):
            total = 0
            for piece in compiled.generate(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            ):
                total += len(piece)
                budget.check_result_length(total)
                pieces.append(piece)
            return "".join(pieces)
    except _Timeout:
        pieces.clear()
        raise _broken(
            f"rendering one conversation took more than {timeout_s:g} s "
            "(a loop that does far too much work)"
        ) from None
    except _TooLarge as err:
        pieces.clear()
        raise _broken(str(err)) from None
    except _Refusal as err:
        raise ChatTemplateError(
            f"the model's chat template refused these messages: {err}", refused=True
        ) from None
    except RecursionError:
        raise _broken("it recurses without end (a macro that calls itself)") from None
    except MemoryError:
        pieces.clear()
        raise _broken("it ran out of memory") from None
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        AttributeError,
        LookupError,
        ArithmeticError,
    ) as err:
        raise _broken(f"rendering failed ({type(err).__name__}: {err})") from err
    finally:
        _BUDGET.reset(token)


#: the conversations a template is test-rendered with (the first it accepts is enough)
SAMPLE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hello!"},),
    (
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
    ),
    (
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ),
)


def check_chat_template(
    template: str, *, timeout_s: float = RENDER_TIMEOUT_S, **variables: Any
) -> None:
    """Test-render ``template`` with short sample conversations; raise
    :class:`ChatTemplateError` if it is broken (a template that refuses a sample
    with ``raise_exception`` is fine: it checks its input)."""
    refusal: ChatTemplateError | None = None
    for conversation in SAMPLE_CONVERSATIONS:
        try:
            render_chat_template(template, conversation, timeout_s=timeout_s, **variables)
        except ChatTemplateError as err:
            if not err.refused:
                raise
            refusal = err
            continue
        return
    reason = refusal.reason.split(": ", 1)[-1] if refusal else ""
    raise _broken(f"it refuses even a one-message conversation ({reason})")
