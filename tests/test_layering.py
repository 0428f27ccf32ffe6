"""Dependencies only run down: every import in ``src/mongars_llm``, read with ``ast``.

The layers are those of docs/architecture.md, from the bottom. A module may import
its own layer (its own package) and the layers below it, never one above. The walk
reads every ``import`` statement of every module: at the top, inside functions and
methods, and under ``if TYPE_CHECKING:``. An import inside a function closes a circle
as surely as one at the top (it only hides it from an import-time test), so it
counts. A ``TYPE_CHECKING`` import counts too: a type from a layer above is still a
dependency on it (use a Protocol of the lower layer instead); ``TYPE_CHECKING_UPWARD``
below lists the ones a type really needs, none today.

A second rule: a module never reaches into a private module (``_name``) of another
package; what crosses a package boundary has a public name in that package's
``__init__``.

Each failure names the importing file, the line and the import.
"""

from __future__ import annotations

import ast
import functools
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "mongars_llm"

# From the bottom; one entry per layer, each a set of first components under
# mongars_llm (a subpackage or a top-level module).
LAYERS: list[set[str]] = [
    {"_version", "errors", "_sampling"},
    # foundations: the standard library, pydantic and the exception tree
    {"settings", "logging", "_fs", "_extras", "_sources", "_machine", "_chat_template", "testing"},
    {"manifest"},
    {"manager"},
    {"registry"},  # standard library and foundations only; provisioning reads it
    {"provisioning"},
    {"runtime"},
    {"export"},
    {"training"},
    {"server"},
    {"cli", "__main__"},
]

# The one written exception (docs/architecture.md): DESIGN §2 puts
# ``ModelManager.ensure_models_installed`` on the manager; it calls ``provision``
# (provisioning sits above the manager). An allowed upward import never runs at
# import time: it sits in a function (or under TYPE_CHECKING, for a type).
UPWARD_ALLOWED: set[tuple[str, str]] = {
    ("mongars_llm.manager", "mongars_llm.provisioning"),
}

# (importing module, imported module) pairs under TYPE_CHECKING that may point up.
TYPE_CHECKING_UPWARD: set[tuple[str, str]] = set()

# (importing module or package, private module of another package) pairs that stay
# for now; each says why. An entry no longer needed fails
# test_the_allow_lists_are_still_needed: delete it then.
PRIVATE_ALLOWED: set[tuple[str, str]] = set()


def _allowed(importer: str, target: str, allowed: set[tuple[str, str]]) -> bool:
    return any(
        target == theirs and (importer == mine or importer.startswith(mine + "."))
        for mine, theirs in allowed
    )


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: Path
    line: int
    target: str  # dotted module name
    type_checking: bool
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def add(node: ast.stmt, target: str, type_checking: bool, in_function: bool) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            found.append(Import(name, path, node.lineno, target, type_checking, in_function))

    def visit(node: ast.AST, type_checking: bool, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True, in_function)
            for child in node.orelse:
                visit(child, type_checking, in_function)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, type_checking, in_function)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                # ``from pkg import _mod`` imports a module: judge the module itself
                target = submodule if submodule in modules else module
                add(node, target, type_checking, in_function)
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking, in_function)

    visit(tree, False, False)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package's own __init__: the lazy public facade, above all
    for index, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return index
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and docs/architecture.md)")


@functools.cache
def _all_imports() -> tuple[Import, ...]:
    modules = _modules()
    return tuple(imp for name, path in modules.items() for imp in _imports(name, path, modules))


def _where(imp: Import) -> str:
    kind = " (under TYPE_CHECKING)" if imp.type_checking else ""
    path = imp.path.relative_to(SRC.parent) if imp.path.is_relative_to(SRC) else imp.path
    return f"{path}:{imp.line}: imports {imp.target}{kind}"


def _owner(module: str) -> str:
    """The package whose private module ``module`` is, or '' when it is not private."""
    parts = module.split(".")
    for index in range(2, len(parts)):
        if parts[index].startswith("_") and not parts[index].startswith("__"):
            return ".".join(parts[:index])
    return ""


def test_every_module_has_a_layer() -> None:
    for name in _modules():
        _layer(name)


def _upward(imports: Iterable[Import]) -> list[str]:
    upward = []
    for imp in imports:
        mine, theirs = _layer(imp.importer), _layer(imp.target)
        if mine is None or theirs is None or theirs <= mine:
            continue
        pair = (".".join(imp.importer.split(".")[:2]), ".".join(imp.target.split(".")[:2]))
        deferred = imp.in_function or imp.type_checking
        if (pair in UPWARD_ALLOWED and deferred) or (
            imp.type_checking and pair in TYPE_CHECKING_UPWARD
        ):
            continue
        upward.append(f"{_where(imp)} (layer {theirs} above {mine})")
    return upward


def test_imports_only_run_down() -> None:
    upward = _upward(_all_imports())
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_reaches_into_another_packages_private_module() -> None:
    reached = []
    for imp in _all_imports():
        owner = _owner(imp.target)
        if not owner or imp.importer == owner or imp.importer.startswith(owner + "."):
            continue
        if _allowed(imp.importer, imp.target, PRIVATE_ALLOWED):
            continue
        reached.append(_where(imp))
    assert not reached, "private modules of another package:\n" + "\n".join(reached)


def test_the_allow_lists_are_still_needed() -> None:
    imports = _all_imports()
    upward = {
        (".".join(i.importer.split(".")[:2]), ".".join(i.target.split(".")[:2])) for i in imports
    }
    assert not UPWARD_ALLOWED - upward, f"delete from UPWARD_ALLOWED: {UPWARD_ALLOWED - upward}"
    unused = {
        entry
        for entry in PRIVATE_ALLOWED
        if not any(_allowed(i.importer, i.target, {entry}) for i in imports)
    }
    assert not unused, f"delete from PRIVATE_ALLOWED: {sorted(unused)}"


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("mongars_llm.runtime._probe", "def f():\n    from ..cli import main\n", "mongars_llm.cli"),
        (
            "mongars_llm.runtime._probe",
            "if TYPE_CHECKING:\n    from ..server import create_app\n",
            "mongars_llm.server",
        ),
        ("mongars_llm.runtime._probe", "import mongars_llm.training\n", "mongars_llm.training"),
        # the manager's one allowed upward import, but at import time
        (
            "mongars_llm.manager",
            "from .provisioning import provision\n",
            "mongars_llm.provisioning",
        ),
    ],
)
def test_the_walk_sees_imports_in_functions_and_under_type_checking(
    tmp_path: Path, importer: str, source: str, expected: str
) -> None:
    probe = tmp_path / "_probe.py"  # read as if it were the importer's file
    probe.write_text(source)
    found = _imports(importer, probe, _modules())
    assert [imp.target for imp in found] == [expected]
    assert len(_upward(found)) == 1


@pytest.mark.parametrize(
    "package", ["mongars_llm.runtime", "mongars_llm.provisioning", "mongars_llm.server"]
)
def test_every_public_name_of_a_package_resolves(package: str) -> None:
    """The names other packages import instead of private modules (some lazily)."""
    if package.endswith("server"):
        pytest.importorskip("fastapi")
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
