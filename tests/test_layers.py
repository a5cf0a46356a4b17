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
#: private names still imported across modules: the API's use of the compiler's helpers, which go when
#: compile, inspect and apply_plan are configurations of one pipeline (issue 13, deliverable 2)
KNOWN_PRIVATE_IMPORTS = {
    ("fxprune.cli", "fxprune.compiler", "_check_runs"),
    ("fxprune.deploy", "fxprune.compiler", "_analyse"),
    ("fxprune.deploy", "fxprune.compiler", "_prepare"),
    ("fxprune.inspection", "fxprune.compiler", "_analyse"),
    ("fxprune.inspection", "fxprune.compiler", "_prepare"),
}


def _contract(contract_id: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c.get("id") == contract_id)


def _modules(folder: str) -> set[str]:
    return {f"{PACKAGES[folder]}.{f.stem}" for f in (ROOT / folder).glob("*.py") if f.stem != "__init__"}


def test_every_module_of_fxprune_and_passes_is_in_one_layer() -> None:
    layered = [m for layer in _contract("layers")["layers"] for m in re.split(r"[:|\s]+", layer) if m]
    assert len(layered) == len(set(layered)), "a module is in two layers"
    assert set(layered) == _modules("fxprune") | _modules("passes")


def test_no_module_imports_private_names_of_another() -> None:
    found = set()
    for folder in PACKAGES:
        for path in (ROOT / folder).glob("*.py"):
            importer = PACKAGES[folder] if path.stem == "__init__" else f"{PACKAGES[folder]}.{path.stem}"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fxprune"):
                    for alias in node.names:
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            found.add((importer, node.module, alias.name))
    assert found <= KNOWN_PRIVATE_IMPORTS, f"private names imported: {sorted(found - KNOWN_PRIVATE_IMPORTS)}"
    assert found == KNOWN_PRIVATE_IMPORTS, (
        f"no longer imported, drop: {sorted(KNOWN_PRIVATE_IMPORTS - found)}"
    )
