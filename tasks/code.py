"""A stage's code version: the hash of every in-repo source file its module imports, transitively.

The closure is read from the sources (the import statements anywhere in a file, function-local ones included,
and the __init__.py of every package on the way), not kept by hand, so a stage's cache key changes whenever code
it runs changes. Imports under `if TYPE_CHECKING:` are skipped (they never run). Only this repository's packages
count: installed libraries are the environment, not the stage's code. Computed once per process.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repository's folders, installed as branchmerge.<folder> (pyproject.toml's package-dir)
PACKAGES = ("flows", "tasks", "models", "kernels")
PREFIX = "branchmerge."


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of an in-repo module or package (its __init__.py), else None."""
    parts = module.removeprefix(PREFIX).split(".")
    if not module.startswith(PREFIX) or parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return PREFIX + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path`'s import statements name (absolute, resolved), runtime ones only."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@lru_cache(maxsize=None)
def closure(module: str, root: Path = ROOT) -> tuple[Path, ...]:
    """The in-repo files `module` runs when imported and called: itself, what it imports (transitively), and the
    __init__.py of every package on the way; sorted. `root`: the repository (another copy, in tests)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(imported_modules(path, root))
    return tuple(sorted(seen))


@lru_cache(maxsize=None)
def code_version(module: str, root: Path = ROOT) -> str:
    """Hash of the closure's paths (relative: the same code anywhere has the same version) and contents."""
    h = hashlib.sha256()
    for path in closure(module, root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
