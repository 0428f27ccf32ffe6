"""Reading, validating and finding manifests (JSON or YAML)."""

from __future__ import annotations

import functools
import json
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import ManifestError
from ._problems import (
    DOCUMENT_ONLY_KEYS,
    LOADER_FIELDS,
    allowed_keys,
    format_json_path,
    problems_from_validation_error,
    unknown_key_problem,
)
from .models import Manifest

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "BUILTIN_SOURCE",
    "builtin_manifest",
    "load_manifest",
    "manifest_problems",
    "parse_manifest",
    "read_manifest_document",
]

BUILTIN_SOURCE = "<built-in>"
BUILTIN_RESOURCE = "default_manifest.json"
JSON_SUFFIXES = (".json",)
YAML_SUFFIXES = (".yaml", ".yml")


def _source_text(source: str | Path | None) -> str | None:
    return None if source is None else str(source)


def manifest_problems(data: Any, *, source: str | Path | None = None) -> list[ManifestError]:
    """Every problem of a decoded manifest document; an empty list when it is valid."""
    return _validate(data, source=_source_text(source), base_dir=Path.cwd())[1]


def parse_manifest(
    data: Any, *, source: str | Path | None = None, base_dir: Path | None = None
) -> Manifest:
    """Validate a decoded JSON/YAML document and return the :class:`Manifest`.

    ``source`` names the file in error messages; ``base_dir`` is the folder
    relative paths resolve against (default: the folder of ``source``, else the
    working directory). Raises :class:`ManifestError` for the first problem; its
    message says how many more there are.
    """
    if base_dir is None:
        base_dir = Path(source).resolve().parent if source is not None else Path.cwd()
    manifest, problems = _validate(data, source=_source_text(source), base_dir=Path(base_dir))
    if manifest is None:
        first = problems[0]
        if len(problems) > 1:
            more = len(problems) - 1
            first.args = (
                f"{first}; and {more} more problem{'s' if more > 1 else ''} "
                "(mongars-llm manifest validate lists them all)",
            )
        raise first
    return manifest


def _validate(
    data: Any, *, source: str | None, base_dir: Path
) -> tuple[Manifest | None, list[ManifestError]]:
    nul = _nul_problem(data, source=source)
    if nul is not None:
        return None, [nul]
    if isinstance(data, dict):
        reserved = [k for k in data if k in LOADER_FIELDS]
        if reserved:
            problem = unknown_key_problem(reserved[0], (), allowed_keys(Manifest), source=source)
            return None, [problem]
        schema_ref = data.get("$schema")
        if schema_ref is not None and not isinstance(schema_ref, str):
            return None, [
                ManifestError(
                    "wrong type for '$schema'",
                    source=source,
                    json_path='["$schema"]',
                    expected="a string (the URL or path of the JSON Schema)",
                )
            ]
        data = {k: v for k, v in data.items() if k not in DOCUMENT_ONLY_KEYS}
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        return None, problems_from_validation_error(err, source=source, data=data)
    except RecursionError:
        return None, [ManifestError("the document is nested too deeply", source=source)]
    updates: dict[str, Any] = {"base_dir": base_dir}
    if source is not None:
        updates["source"] = Path(source)
    return manifest.model_copy(update=updates), []


def _nul_problem(root: Any, *, source: str | None) -> ManifestError | None:
    """A NUL character in any key or string of the document: no path or name may hold one."""
    stack: list[tuple[Any, list[Any]]] = [(root, [])]
    while stack:  # iterative: a hostile document must not exhaust the stack
        node, loc = stack.pop()
        if isinstance(node, str) and "\x00" in node:
            return ManifestError(
                "the value contains a NUL character (\\x00), which no name or path may hold",
                source=source,
                json_path=format_json_path(loc),
                expected="text without NUL characters; remove the \\u0000 escape",
            )
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and "\x00" in key:
                    return ManifestError(
                        "a key contains a NUL character (\\x00)",
                        source=source,
                        json_path=format_json_path([*loc, key]),  # JSON-escaped: \u0000
                        expected="keys without NUL characters; remove the \\u0000 escape",
                    )
                stack.append((value, [*loc, key]))
        elif isinstance(node, list):
            stack.extend((value, [*loc, i]) for i, value in enumerate(node))
    return None


def _duplicate_key_path(root: Any, target: int) -> list[Any] | None:
    """JSON path (as a loc) of the object whose ``id`` is ``target``, found iteratively."""
    stack: list[tuple[Any, list[Any]]] = [(root, [])]
    while stack:
        node, loc = stack.pop()
        if id(node) == target:
            return loc
        if isinstance(node, dict):
            stack.extend((v, [*loc, k]) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, [*loc, i]) for i, v in enumerate(node))
    return None


class _HugeIntegerError(ValueError):
    """An integer literal longer than Python converts (``sys.get_int_max_str_digits()``)."""


def _max_int_digits() -> int:
    return sys.get_int_max_str_digits() or sys.maxsize


def _huge_integer(digits: int, source: str, where: str) -> ManifestError:
    limit = _max_int_digits()
    return ManifestError(
        f"an integer with {digits} digits{where} is too large to read (the limit is {limit} "
        "digits)",
        source=source,
        expected="a number of a sensible size; sampling values and options are small numbers",
    )


def _load_json(text: str, source: str) -> Any:
    duplicates: list[tuple[int, str]] = []

    def parse_int(literal: str) -> int:
        try:
            return int(literal)
        except ValueError as err:
            raise _HugeIntegerError(literal) from err

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                duplicates.append((id(out), key))
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_int=parse_int)
    except _HugeIntegerError as err:
        literal = str(err.args[0])
        digits = len(literal.lstrip("-"))
        start = text.find(literal)
        where = ""
        if start >= 0:
            line = text.count("\n", 0, start) + 1
            column = start - (text.rfind("\n", 0, start) + 1) + 1
            where = f" at line {line}, column {column}"
        raise _huge_integer(digits, source, where) from err
    except json.JSONDecodeError as err:
        raise ManifestError(
            f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
            source=source,
            expected="a JSON object",
        ) from err
    except RecursionError as err:
        raise ManifestError("the JSON document is nested too deeply", source=source) from err
    if duplicates:
        owner, key = duplicates[0]
        loc = _duplicate_key_path(data, owner)
        raise ManifestError(
            f"duplicate key {key!r}: JSON keeps only the last one, which hides a mistake",
            source=source,
            json_path=format_json_path([*(loc or []), key]),
            expected="each key once per object",
        )
    return data


def _yaml_children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_yaml_size(root: Any, *, max_nodes: int, source: str) -> None:
    """Refuse a YAML node graph that holds more than ``max_nodes`` values once its
    aliases are expanded ("billion laughs"), or that refers to itself.

    Counted on the composed graph, where an alias is a shared node: linear in the
    file's size, whatever the expansion would be.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes on the current depth-first path
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            size = 1 + sum(sizes[id(child)] for child in _yaml_children(node))
            if size > max_nodes:
                mark = node.start_mark
                raise ManifestError(
                    f"the YAML at line {mark.line + 1}, column {mark.column + 1} expands to more "
                    f"than {max_nodes} values once its aliases (*name) are expanded; refusing to "
                    "read it (limit MONGARS_MANIFEST_MAX_NODES)",
                    source=source,
                    expected="a manifest without runaway anchors and aliases; write the values "
                    "out, or raise MONGARS_MANIFEST_MAX_NODES",
                )
            sizes[key] = size
            continue
        if key in sizes:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in _yaml_children(node):
            if id(child) in open_nodes:
                mark = child.start_mark
                raise ManifestError(
                    f"the YAML alias at line {mark.line + 1}, column {mark.column + 1} refers to "
                    "a node that contains it (a recursive structure)",
                    source=source,
                    expected="anchors and aliases that do not refer to themselves",
                )
            if id(child) not in sizes:
                stack.append((child, False))


def _load_yaml(text: str, source: str, *, max_nodes: int) -> Any:
    import yaml

    class _UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that rejects a key repeated in one mapping."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != (
                    "tag:yaml.org,2002:merge"
                ):
                    ident = (key_node.tag, key_node.value)
                    if ident in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"found duplicate key {key_node.value!r}",
                            key_node.start_mark,
                        )
                    seen.add(ident)
            return super().construct_mapping(node, deep=deep)

    def construct_int(loader: yaml.SafeLoader, node: Any) -> Any:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > _max_int_digits():
            mark = node.start_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
            raise _huge_integer(digits, source, where)
        return yaml.SafeLoader.construct_yaml_int(loader, node)

    _UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", construct_int)

    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, max_nodes=max_nodes, source=source)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(
            f"invalid YAML{where}: {problem}", source=source, expected="a YAML mapping"
        ) from err
    except RecursionError as err:
        raise ManifestError("the YAML document is nested too deeply", source=source) from err
    finally:
        loader.dispose()


def read_manifest_document(path: str | Path, *, settings: Settings | None = None) -> Any:
    """Read and decode a manifest file (``.json``, ``.yaml`` or ``.yml``), unvalidated.

    Files over ``settings.manifest_max_bytes``, and YAML whose aliases expand to
    more than ``settings.manifest_max_nodes`` values, are refused.
    """
    if "\x00" in str(path):
        raise ManifestError(
            "the manifest path contains a NUL character (\\x00)",
            source=str(path).replace("\x00", "\\x00"),
            expected="a file path without NUL characters",
        )
    if settings is None:
        from ..settings import get_settings

        settings = get_settings()
    path = Path(path).expanduser()
    source = str(path)
    if not path.exists():
        raise ManifestError(
            "manifest file not found",
            source=source,
            expected="an existing .json, .yaml or .yml file; check the path, or omit it to "
            "use the configured manifest (MONGARS_LLM_MODELS_PATH) or the built-in one",
        )
    if not path.is_file():
        raise ManifestError("not a file", source=source, expected="a .json, .yaml or .yml file")
    suffix = path.suffix.lower()
    if suffix not in (*JSON_SUFFIXES, *YAML_SUFFIXES):
        raise ManifestError(
            f"unsupported manifest file type {suffix or '(no extension)'!r}",
            source=source,
            expected="a file ending in .json, .yaml or .yml",
        )
    limit = settings.manifest_max_bytes
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)  # never more, whatever stat() said
        if len(raw) > limit:
            raise ManifestError(
                f"the file is larger than {limit} bytes, the manifest size limit "
                "(MONGARS_MANIFEST_MAX_BYTES)",
                source=source,
                expected="a smaller manifest, or raise MONGARS_MANIFEST_MAX_BYTES",
            )
        text = raw.decode("utf-8-sig")  # a BOM from Windows editors is fine
    except UnicodeDecodeError as err:
        raise ManifestError(
            f"not UTF-8 text (byte {err.start})", source=source, expected="a UTF-8 encoded file"
        ) from err
    except OSError as err:
        raise ManifestError(f"cannot read the file: {err.strerror or err}", source=source) from err
    if suffix in JSON_SUFFIXES:
        return _load_json(text, source)
    data = _load_yaml(text, source, max_nodes=settings.manifest_max_nodes)
    if data is None:
        raise ManifestError(
            "the manifest is empty",
            source=source,
            expected="a mapping with a 'profiles' key",
        )
    return data


def load_manifest(path: str | Path | None = None, *, settings: Settings | None = None) -> Manifest:
    """Load and validate a manifest file.

    With no ``path``: ``settings.llm_models_path`` when that file exists, else
    the built-in manifest. A path configured explicitly (argument, environment
    or ``Settings(llm_models_path=...)``) that does not exist is an error rather
    than a silent fallback. Relative paths inside the manifest resolve against
    the manifest file's folder.
    """
    if path is None:
        if settings is None:
            from ..settings import get_settings

            settings = get_settings()
        configured = Path(settings.llm_models_path).expanduser()
        if configured.is_file():
            path = configured
        elif "llm_models_path" in settings.model_fields_set:
            raise ManifestError(
                "manifest file not found",
                source=str(configured),
                expected="an existing .json, .yaml or .yml file; fix MONGARS_LLM_MODELS_PATH "
                "(or llm_models_path) or unset it to use the built-in manifest",
            )
        else:
            return builtin_manifest()
    path = Path(path).expanduser()
    data = read_manifest_document(path, settings=settings)
    return parse_manifest(data, source=path, base_dir=path.resolve().parent)


@functools.lru_cache(maxsize=1)
def builtin_manifest() -> Manifest:
    """The manifest shipped with the package (profiles ``default``, ``smol`` and ``small``)."""
    resource = resources.files(__package__) / BUILTIN_RESOURCE
    data = json.loads(resource.read_text(encoding="utf-8"))
    manifest = parse_manifest(data, source=BUILTIN_SOURCE, base_dir=Path(__file__).parent)
    return manifest.model_copy(update={"source": None})
