"""The import layers of pyproject.toml's import-linter contracts (checked by ``.ci/lint-imports``) cover
every module, and no module of the package imports another module's private names."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (pyproject's package-dir)
PACKAGES = {"fxprune": "fxprune", "passes": "fxprune.passes", "models_zoo": "fxprune.models_zoo"}
#: where code that uses the package lives: it goes through public names and pipelines too
USERS = ("tests", "bench")


def _contract(contract_id: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c.get("id") == contract_id)


def _modules(folder: str) -> set[str]:
    return {f"{PACKAGES[folder]}.{f.stem}" for f in (ROOT / folder).glob("*.py") if f.stem != "__init__"}


def test_every_module_of_fxprune_and_passes_is_in_one_layer() -> None:
    layered = [m for layer in _contract("layers")["layers"] for m in re.split(r"[:|\s]+", layer) if m]
    assert len(layered) == len(set(layered)), "a module is in two layers"
    assert set(layered) == _modules("fxprune") | _modules("passes")


def _sources() -> list[tuple[str, Path]]:
    """(importer name, path) of every Python file of the package, the tests and the benches."""
    out = []
    for folder in (*PACKAGES, *USERS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder in PACKAGES:
                out.append(
                    (PACKAGES[folder] if path.stem == "__init__" else f"{PACKAGES[folder]}.{path.stem}", path)
                )
            else:
                out.append((str(path.relative_to(ROOT)), path))
    return out


def test_no_module_imports_private_names_of_another() -> None:
    """Private names stay in their module: the API, the tests and the benches use public functions and
    build or alter pipelines (fxprune.stages) instead of importing helpers."""
    found = []
    for importer, path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fxprune"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append((importer, node.module, alias.name))
    assert not found, f"private names imported: {found}"


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_test_or_bench_patches_the_pipeline_modules() -> None:
    """Tests and benches change what runs by passing a pipeline (``compile(pipeline=...)``) or an op table
    (``compile_pipeline(table)``), never by assigning to or monkeypatching the compiler's, the stages' or
    the default op table's module globals."""
    wired = ("fxprune.compiler", "fxprune.stages", "fxprune.pipeline", "fxprune.passes.op_table")
    short = {w.rpartition(".")[2] for w in wired}  # the module imported by name: `from fxprune import stages`
    found = []
    for importer, path in _sources():
        if importer.startswith("fxprune"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = [t.value for t in node.targets if isinstance(t, ast.Attribute)]
            elif (
                isinstance(node, ast.Call)
                and _dotted(node.func).endswith(("setattr", "setitem"))
                and node.args
            ):
                targets = [node.args[0]]
            found += [
                f"{importer}:{node.lineno}"
                for t in targets
                if _dotted(t).startswith(wired) or _dotted(t).partition(".")[0] in short
            ]
    assert not found, f"pipeline modules patched at: {found}"
