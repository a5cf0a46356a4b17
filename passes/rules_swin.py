"""Moved: the Swin ops are the ``swin`` op family (``fxprune.passes.ops_swin``). ``EXPANSIONS``, the
``trace`` expansions of the default op table, stays importable here for earlier imports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fxprune.passes.op_table import DEFAULT_TABLE

from fxprune.trace import Expansion

__all__ = ["EXPANSIONS"]

EXPANSIONS: Mapping[Any, Expansion] = DEFAULT_TABLE.expansions
