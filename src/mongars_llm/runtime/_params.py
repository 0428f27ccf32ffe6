"""Sampling parameters of a generation call: their names, their bounds, role defaults.

:class:`SamplingParams` is the one place that spells the sampling arguments of
``generate``/``stream``/``agenerate``/``astream`` (``max_new_tokens``,
``temperature``, ``top_p``, ``top_k``, ``stop``, ``adapter``, ``seed``,
``repetition_penalty``). Building one validates every value, so a bad value
fails at the call with an :class:`~mongars_llm.errors.InvalidInputError` that
names the argument, not later inside torch. :class:`SamplingKwargs` types the
same names as keyword arguments (``**kwargs: Unpack[SamplingKwargs]``).
:class:`RoleDefaults` carries a manifest role's defaults, which fill in what
the call left unset. The bounds are :mod:`mongars_llm._sampling`'s, which the
manifest checks too.

Standard library only: the HTTP layer can validate with it without torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

from .._sampling import MIN_TEMPERATURE, SEED_MAX, SEED_MIN
from ..errors import InvalidInputError

__all__ = [
    "MIN_TEMPERATURE",
    "SAMPLING_NAMES",
    "SEED_MAX",
    "SEED_MIN",
    "RoleDefaults",
    "RoleResolver",
    "SamplingKwargs",
    "SamplingParams",
    "check_text",
]

#: a lone UTF-16 surrogate: never part of valid text in a Python str
_SURROGATE = re.compile("[\ud800-\udfff]")


def _fail(param: str, message: str) -> InvalidInputError:
    return InvalidInputError(message, param=param)


def check_text(value: str, param: str) -> str:
    """``value``, or :class:`InvalidInputError` when it holds a lone UTF-16 surrogate:
    not text a tokenizer can read (bytes that were not UTF-8, as Python decodes them
    from stdin or ``os.fsdecode``; a lone ``\\ud800`` escape in JSON)."""
    found = _SURROGATE.search(value)
    if found is not None:
        raise _fail(
            param,
            f"{param} holds a lone UTF-16 surrogate (\\u{ord(found.group()):04x}) at "
            f"character {found.start()}, which is not valid Unicode text: decode the input "
            "as UTF-8 (bytes that are not UTF-8 become such surrogates)",
        )
    return value


def _integer(name: str, value: Any, *, low: int, high: int | None = None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise _fail(name, f"{name} must be an integer, got {value!r}")
    number = int(value)
    if number < low or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise _fail(name, f"{name} must be {bounds}, got {value!r}")
    return number


def _real(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _fail(name, f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise _fail(name, f"{name} must be a finite number, got {value!r}")
    return number


def _strings(name: str, value: Any, *, allow_empty_list: bool) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence):
        raise _fail(name, f"{name} must be a string or a list of strings, got {value!r:.80}")
    items = tuple(items)
    if any(not isinstance(item, str) or not item for item in items):
        raise _fail(name, f"{name} must hold non-empty strings, got {value!r:.80}")
    if not items and not allow_empty_list:
        return None
    return items


@dataclass(frozen=True)
class SamplingParams:
    """The sampling arguments of one generation call, validated and normalised.

    ``None`` means "not given": the role's default, else the model's. ``stop``
    and ``adapter`` become tuples (``adapter=()`` is the bare base model).
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | Sequence[str] | None = None
    adapter: str | Sequence[str] | None = None
    seed: int | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        temperature = _real("temperature", self.temperature)
        if temperature is not None:
            if temperature < 0:
                raise _fail("temperature", f"temperature must be >= 0, got {self.temperature!r}")
            if 0 < temperature < MIN_TEMPERATURE:
                raise _fail(
                    "temperature",
                    f"temperature={self.temperature!r} is too small to sample with (the "
                    f"smallest is {MIN_TEMPERATURE:g}); use 0 for greedy decoding",
                )
        top_p = _real("top_p", self.top_p)
        if top_p is not None and not 0 < top_p <= 1:
            raise _fail("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        penalty = _real("repetition_penalty", self.repetition_penalty)
        if penalty is not None and penalty <= 0:
            raise _fail(
                "repetition_penalty",
                f"repetition_penalty must be > 0 (1 is no penalty), got {self.repetition_penalty!r}",
            )
        values: dict[str, Any] = {
            "max_new_tokens": _integer("max_new_tokens", self.max_new_tokens, low=1),
            "temperature": temperature,
            "top_p": top_p,
            "top_k": _integer("top_k", self.top_k, low=0),
            "stop": _strings("stop", self.stop, allow_empty_list=False),
            "adapter": _strings("adapter", self.adapter, allow_empty_list=True),
            "seed": _integer("seed", self.seed, low=SEED_MIN, high=SEED_MAX),
            "repetition_penalty": penalty,
        }
        for name, value in values.items():  # normalised: plain int/float, tuples
            object.__setattr__(self, name, value)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> SamplingParams:
        """Parameters from keyword arguments; an unknown name is a ``TypeError``."""
        unknown = set(kwargs) - set(SAMPLING_NAMES)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    def with_defaults(self, defaults: Mapping[str, Any]) -> SamplingParams:
        """These parameters, with ``defaults`` (a role's) filling the ones not given.

        ``adapter`` is never taken from ``defaults``: a role names its adapters
        in :attr:`RoleDefaults.adapters`.
        """
        fill = {
            name: defaults[name]
            for name in SAMPLING_NAMES
            if name != "adapter" and getattr(self, name) is None and defaults.get(name) is not None
        }
        return dataclasses.replace(self, **fill) if fill else self

    def as_kwargs(self) -> SamplingKwargs:
        """The parameters that are set, as the keyword arguments of the generation calls."""
        given = {name: getattr(self, name) for name in SAMPLING_NAMES}
        return cast(SamplingKwargs, {k: v for k, v in given.items() if v is not None})


#: the sampling keyword arguments of the generation calls, in signature order
SAMPLING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingParams))


class SamplingKwargs(TypedDict, total=False):
    """The sampling keyword arguments of ``generate_batch``/``stream``/``agenerate``/
    ``astream`` (``**kwargs: Unpack[SamplingKwargs]``), so that a type checker
    sees a wrong name or type at the call.

    The same names and types as :class:`SamplingParams`'s fields (a test keeps
    the two in step); the values are checked when the call builds its
    ``SamplingParams``.
    """

    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    stop: str | Sequence[str] | None
    adapter: str | Sequence[str] | None
    seed: int | None
    repetition_penalty: float | None


@dataclass(frozen=True)
class RoleDefaults:
    """What a manifest role sets for the generation calls that name it.

    ``parameters`` are its sampling defaults (other keys are ignored);
    ``adapters`` the adapters it lists, or ``None`` when it lists none (the
    runtime's defaults then apply).
    """

    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    adapters: tuple[str, ...] | None = None


#: looks a role up by name (raises :class:`~mongars_llm.errors.UnknownRoleError`)
RoleResolver = Callable[[str], RoleDefaults]
