"""The default op table: the op families fxprune knows, listed once.

``DependencyPass``, ``RewritePass``, compensation and the ONNX writer use ``DEFAULT_TABLE`` unless given a
table. A table with one entry changed is ``DEFAULT_TABLE.replace(key, rule=...)``; one with another family
is ``OpTable((*DEFAULT_TABLE.families, my_family))``. See ``fxprune.passes.family`` for what an entry
holds and how modules are looked up.
"""

from __future__ import annotations

from fxprune.passes import (
    ops_activation,
    ops_attention,
    ops_conv,
    ops_elementwise,
    ops_graph,
    ops_linear,
    ops_mvit,
    ops_norm,
    ops_pool,
    ops_resample,
    ops_shape,
    ops_swin,
)
from fxprune.passes.family import OpTable

__all__ = ["DEFAULT_TABLE"]

DEFAULT_TABLE = OpTable(
    (
        ops_graph.FAMILY,
        ops_activation.FAMILY,
        ops_pool.FAMILY,
        ops_elementwise.FAMILY,
        ops_shape.FAMILY,
        ops_conv.FAMILY,
        ops_linear.FAMILY,
        ops_norm.FAMILY,
        ops_attention.FAMILY,
        ops_swin.FAMILY,
        ops_mvit.FAMILY,
        ops_resample.FAMILY,
    )
)
