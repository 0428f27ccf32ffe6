"""Turn pydantic validation errors into :class:`ManifestError` problems.

Each problem names the file, the JSON path of the offending value
(``profiles.default.models.general.parameters.top_p``, list items as
``adapters[0]``) and what would have been accepted. Unknown keys come with the
closest valid key.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from ..errors import ManifestError
from .models import Manifest, Profile, RoleEntry

__all__ = ["format_json_path", "problems_from_validation_error", "unknown_key_problem"]

#: Keys of the document's top level that are not fields of :class:`Manifest`.
DOCUMENT_ONLY_KEYS = ("$schema",)
#: Fields of :class:`Manifest` set by the loader, never by the document.
LOADER_FIELDS = ("source", "base_dir")

_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_NAME_RULE = (
    "a name made of letters, digits, '_', '-' or '.', starting with a letter or digit "
    "(at most 64 characters)"
)


def format_json_path(loc: Sequence[Any]) -> str:
    """``("profiles", "default", "adapters", 0)`` -> ``profiles.default.adapters[0]``.

    Keys that are not plain identifiers are quoted: ``profiles["my profile"]``.
    """
    out = ""
    for item in loc:
        if isinstance(item, int) and not isinstance(item, bool):
            out += f"[{item}]"
        elif isinstance(item, str) and _SIMPLE_KEY.match(item):
            out += f".{item}" if out else item
        else:
            out += f"[{json.dumps(str(item), ensure_ascii=False)}]"
    return out


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = object.__repr__(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_value(value: Any) -> str:
    """A JSON-flavoured description of a value: ``a string "0.9"``, ``null``, ``an object``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {_short(value)}"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, float):
        return f"the number {_short(value)}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``Optional`` layers."""
    while True:
        origin = get_origin(annotation)
        if origin is typing.Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _step(annotation: Any, item: Any) -> tuple[Any, FieldInfo | None] | None:
    """The annotation found one level below ``annotation`` at ``item``."""
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(item) if isinstance(item, str) else None
        return (field.annotation, field) if field is not None else None
    origin = get_origin(annotation)
    if origin is list and isinstance(item, int):
        return get_args(annotation)[0], None
    if origin is dict:
        if item == "[key]":
            return get_args(annotation)[0], None
        return get_args(annotation)[1], None
    return None


def _locate(loc: Sequence[Any]) -> tuple[Any, FieldInfo | None] | None:
    """Annotation and field of the value at ``loc`` in a :class:`Manifest`."""
    found: tuple[Any, FieldInfo | None] = (Manifest, None)
    for item in loc:
        step = _step(found[0], item)
        if step is None:
            return None
        found = step
    return found


def allowed_keys(model: type[BaseModel]) -> list[str]:
    keys = [
        name for name in model.model_fields if not (model is Manifest and name in LOADER_FIELDS)
    ]
    return [*keys, *DOCUMENT_ONLY_KEYS] if model is Manifest else keys


def _constraints(field: FieldInfo | None) -> list[str]:
    if field is None:
        return []
    out = []
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Gt):
            out.append(f"> {meta.gt}")
        elif isinstance(meta, annotated_types.Ge):
            out.append(f">= {meta.ge}")
        elif isinstance(meta, annotated_types.Lt):
            out.append(f"< {meta.lt}")
        elif isinstance(meta, annotated_types.Le):
            out.append(f"<= {meta.le}")
        elif isinstance(meta, annotated_types.MinLen) and meta.min_length > 0:
            out.append(f"at least {meta.min_length} long")
        elif getattr(meta, "pattern", None) == r"^[0-9a-fA-F]{64}$":
            out.append("of 64 hexadecimal digits")
    return out


def expected_for(annotation: Any, field: FieldInfo | None = None) -> str:
    """What a value of ``annotation`` looks like, in words."""
    constraints = _constraints(field)
    if get_origin(annotation) is typing.Annotated and any(
        (getattr(meta, "min_length", None) or 0) >= 1 for meta in get_args(annotation)[1:]
    ):
        constraints.append("non-empty")
    annotation = _unwrap(annotation)
    suffix = f" {' and '.join(constraints)}" if constraints else ""
    if annotation is RoleEntry:
        return "a model name (string) or an object with a 'name' and optional " + ", ".join(
            f"'{k}'" for k in allowed_keys(RoleEntry) if k != "name"
        )
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "an object with keys " + ", ".join(f"'{k}'" for k in allowed_keys(annotation))
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"'{v}'" for v in get_args(annotation))
    if origin is list:
        return f"a list{suffix} of {_plural(expected_for(get_args(annotation)[0]))}"
    if origin is dict:
        return "an object with at least one entry" if constraints else "an object"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return f"an integer{suffix}"
    if annotation is float:
        return f"a number{suffix}"
    if annotation is str:
        if "of 64 hexadecimal digits" in constraints:
            return "a string of 64 hexadecimal digits (a SHA-256)"
        return "a non-empty string" if constraints else "a string"
    return "a valid value"


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            return (
                text[len(article) :].replace("string", "strings", 1).replace("object", "objects", 1)
            )
    return text


def unknown_key_problem(
    key: Any,
    loc: Sequence[Any],
    allowed: Sequence[str],
    *,
    source: str | None,
    hint: str | None = None,
) -> ManifestError:
    """``unknown key 'temprature'; did you mean 'temperature'?``"""
    text = str(key)
    close = difflib.get_close_matches(
        text, list(allowed), n=1, cutoff=0.6
    ) or difflib.get_close_matches(text.lower(), [a.lower() for a in allowed], n=1, cutoff=0.6)
    message = f"unknown key {text!r}"
    if close:
        suggestion = next((a for a in allowed if a.lower() == close[0].lower()), close[0])
        message += f"; did you mean {suggestion!r}?"
    elif hint:
        message += f"; {hint}"
    return ManifestError(
        message,
        source=source,
        json_path=format_json_path([*loc, key]),
        expected="one of the keys " + ", ".join(f"'{a}'" for a in allowed),
    )


_TYPE_ERRORS = {
    "string_type",
    "int_type",
    "float_type",
    "bool_type",
    "dict_type",
    "list_type",
    "model_type",
    "model_attributes_type",
    "int_from_float",
    "none_required",
    "is_instance_of",
}


def _within_document(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """``loc`` cut where the document has no deeper node.

    A shorthand role (``"general": ""``) is validated as ``{"name": ""}``: the
    problem belongs to ``...general``, not to a ``name`` key the file lacks.
    """
    node = data
    for depth, item in enumerate(loc):
        in_dict = isinstance(node, dict) and item in node
        in_list = isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node)
        if in_dict or in_list:
            node = node[item]
        else:
            return loc if isinstance(node, dict) or item == "[key]" else loc[:depth]
    return loc


def _problem(error: Any, *, source: str | None, data: Any = None) -> ManifestError:
    loc = tuple(error.get("loc", ()))
    if data is not None and error.get("type") != "extra_forbidden":
        loc = _within_document(loc, data)
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "extra_forbidden" and loc:
        parent = _locate(loc[:-1])
        model = _unwrap(parent[0]) if parent else None
        allowed = (
            allowed_keys(model) if isinstance(model, type) and issubclass(model, BaseModel) else []
        )
        hints: dict[Any, str] = {
            Manifest: "profiles go under 'profiles'",
            Profile: "roles go under 'models'",
        }
        hint = hints.get(model)
        return unknown_key_problem(loc[-1], loc[:-1], allowed, source=source, hint=hint)

    if loc and loc[-1] == "[key]":  # a profile or role name that breaks the naming rule
        owner = "profile" if len(loc) == 3 else "role"
        return ManifestError(
            f"invalid {owner} name {_short(loc[-2])}",
            source=source,
            json_path=format_json_path(loc[:-1]),
            expected=_NAME_RULE,
        )

    located = _locate(loc)
    annotation, field = located if located else (None, None)
    expected = expected_for(annotation, field) if located else None
    if not loc and kind in _TYPE_ERRORS:
        return ManifestError(
            f"a manifest must be an object with a 'profiles' key, not {describe_value(value)}",
            source=source,
            json_path="",
            expected='{"profiles": {"default": {"models": {"general": "org/model"}}}}',
        )
    if kind == "missing":
        return ManifestError(
            f"missing required key {loc[-1]!r}" if loc else "missing value",
            source=source,
            json_path=format_json_path(loc),
            expected=expected,
        )
    if kind == "too_short" and loc and loc[-1] in ("profiles", "models"):
        what = "profile" if loc[-1] == "profiles" else "role"
        return ManifestError(
            f"at least one {what} is required",
            source=source,
            json_path=format_json_path(loc),
            expected=expected,
        )
    if kind in _TYPE_ERRORS:
        return ManifestError(
            f"wrong type: got {describe_value(value)}",
            source=source,
            json_path=format_json_path(loc),
            expected=expected,
        )
    message = str(error.get("msg", "invalid value"))
    if kind.startswith("value_error") or message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
        expected = None
    elif kind in ("literal_error", "string_pattern_mismatch") and expected:
        message = f"invalid value {_short(value)}"
    else:
        detail = message.replace("Input should be", "must be").replace("should be", "must be")
        message = f"invalid value {_short(value)}: {detail[:1].lower()}{detail[1:]}"
    return ManifestError(message, source=source, json_path=format_json_path(loc), expected=expected)


def problems_from_validation_error(
    error: ValidationError, *, source: str | None, data: Any = None
) -> list[ManifestError]:
    """Every error of ``error``, as :class:`ManifestError` objects, unknown keys first.

    ``data`` (the validated document) keeps each JSON path within the document.
    """
    details = error.errors(include_url=False)
    ordered = sorted(details, key=lambda e: e.get("type") != "extra_forbidden")
    return [_problem(detail, source=source, data=data) for detail in ordered]
