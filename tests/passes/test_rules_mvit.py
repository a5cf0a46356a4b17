"""MViT rules (``passes/ops_mvit.py``) and the generic rules MViT needs: ``tensor_split``, a class token
read through ``expand(...).unsqueeze(...)``, a fused q/k/v reshaped to ``(3, heads, head_dim)``, and a
conv over channels on the batch dim (``passes/ops_shape.py``, ``ops_attention.py``, ``ops_conv.py``)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent, randomize_norms
from torchvision.models.video import mvit as tv

import fxprune

X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))  # [B, tokens, features]


def _group_with(dep: fxprune.DependencyResult, param: str, role: str = "out") -> fxprune.ChannelGroup:
    hits = [g for g in dep.groups if any(s.param == param and s.role == role for s in g.sites)]
    assert len(hits) == 1, f"{param} ({role}) in {len(hits)} groups"
    return hits[0]


def _compile(model: nn.Module, x: torch.Tensor, target: float, verify: bool = True) -> fxprune.CompileResult:
    r = fxprune.compile(
        model.eval(), x, target, latency_runs=0, score="magnitude", progress=False, verify=verify
    )
    assert r.plan.removed_channels > 0
    assert not verify or (r.verification is not None and r.verification.passed), r.verification
    assert_masked_equivalent(model, r, x)
    assert fxprune.count_flops(r.graph_module, (x,)) == r.flops_after
    return r


# ----------------------------------------------------------------------------------------- tensor_split
class _Split(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 3)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = torch.tensor_split(F.relu(self.a(x)), (1,), dim=self.dim)
        return self.b(torch.cat((first * 2.0, rest), dim=self.dim))


def test_tensor_split_off_the_channel_dim_is_channel_wise() -> None:
    g = _group_with(fxprune.dependency_graph(_Split(1).eval(), X), "a.weight")
    assert g.prunable
    _compile(_Split(1), X, 0.6)


def test_tensor_split_of_the_channel_dim_pins() -> None:
    g = _group_with(fxprune.dependency_graph(_Split(-1).eval(), X), "a.weight")
    assert "tensor_split along the channel dim" in " ".join(g.pinned)


# ----------------------------------------------------------------------------------------- class token
class _ClassToken(nn.Module):
    """MViT's ``PositionalEncoding``: ``class_token [C]`` expanded over the batch, then unsqueezed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 3)
        self.class_token = nn.Parameter(torch.randn(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = torch.cat((self.class_token.expand(y.size(0), -1).unsqueeze(1), y), dim=1)
        return self.b(F.gelu(y))


def test_class_token_through_unsqueeze_is_sliced_with_the_stream() -> None:
    g = _group_with(fxprune.dependency_graph(_ClassToken().eval(), X), "a.weight")
    assert g.prunable and any(s.param == "class_token" for s in g.sites)
    r = _compile(_ClassToken(), X, 0.6)
    assert r.graph_module.class_token.shape[0] == r.graph_module.a.out_features


# --------------------------------------------------------------- fused q/k/v, heads through a batch conv
class _PooledAttention(nn.Module):
    """A fused q/k/v linear reshaped to ``(3, heads, d)``, k pooled by a depthwise conv over
    ``[B * heads, d, T]`` (the heads on the batch dim), then attention per head and a projection."""

    def __init__(self, heads: int = 4, d: int = 3, from_shape: bool = True) -> None:
        super().__init__()
        self.heads, self.d, self.from_shape = heads, d, from_shape
        self.qkv = nn.Linear(8, 3 * heads * d)
        self.pool = nn.Conv1d(d, d, 3, padding=1, groups=d, bias=False)
        self.proj = nn.Linear(heads * d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.d).transpose(1, 3).unbind(dim=2)
        k = k.transpose(2, 3)
        heads = k.shape[1] if self.from_shape else self.heads  # MViT reads it from the shape
        k = self.pool(k.reshape(B * heads, self.d, N)).reshape(B, self.heads, self.d, N)
        attn = torch.matmul(0.5 * q, k).softmax(dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(B, N, self.heads * self.d)
        return x + self.proj(y)


def test_fused_qkv_heads_are_one_group_through_a_pooling_conv() -> None:
    dep = fxprune.dependency_graph(_PooledAttention().eval(), X)
    heads = _group_with(dep, "qkv.weight")
    assert heads.prunable and heads.size == 4  # 4 heads of 3
    assert sorted((s.dim, s.offset, s.repeat) for s in heads.sites if s.param == "qkv.weight") == [
        (0, o, 3) for o in (0, 12, 24)
    ]
    assert not any(s.param == "pool.weight" for s in heads.sites), "the conv is shared by every head"
    r = _compile(_PooledAttention(), X, 0.6)
    kept = r.graph_module.qkv.out_features // 9
    assert kept < 4 and r.graph_module.proj.in_features == 3 * kept
    assert re.search(rf"reshape\(\w+, \w+, 3, {kept}, 3\)", r.graph_module.code), "heads literal follows"


def test_a_batch_size_computed_from_a_literal_head_count_pins_the_heads() -> None:
    """``reshape(B * self.heads, ...)`` puts the heads on the batch dim with a size the rewrite cannot make
    follow the kept heads (``self.heads`` is a Python int): pinned with that reason (it used to pass the
    heads on and leave the pruned graph failing at that reshape)."""
    heads = _group_with(fxprune.dependency_graph(_PooledAttention(from_shape=False).eval(), X), "qkv.weight")
    assert "reshape to a size computed from something else than the channels" in " ".join(heads.pinned)


# ------------------------------------------------------------------------------------- torchvision MViT
def _tiny_mvit() -> nn.Module:
    """mvit_v2_s's structure (relative positions, residual pooling, q/kv pooling with strides, a stage
    with more heads and a wider stream) at 2 x 16 x 16."""
    cfg = [
        tv.MSBlockConfig(1, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
        tv.MSBlockConfig(2, 8, 16, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
        tv.MSBlockConfig(2, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 1, 1]),
    ]
    torch.manual_seed(0)
    model = tv.MViT(
        (16, 16), 2, cfg, residual_pool=True, residual_with_cls_embed=False, rel_pos_embed=True,
        proj_after_attn=True, num_classes=5,
    )  # fmt: skip
    with torch.no_grad():  # a fresh class token is zero: make the oracle see it
        model.pos_encoding.class_token.normal_()
    return randomize_norms(model).eval()


XM = torch.randn(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(3))


def test_tiny_mvit_pins_only_the_logits_and_a_one_head_attention() -> None:
    dep = fxprune.dependency_graph(_tiny_mvit(), XM)
    pinned = sorted({re.sub(r"'[^']*'", "…", p) for g in dep.groups for p in g.pinned})
    # a one-head attention's q, k, v: the reshape to (3, 1, d) leaves the channels on the q/k/v dim
    assert pinned == ["reaches the graph output at node …", "unbind along the channel dim at node …"]
    heads = _group_with(dep, "blocks.1.attn.qkv.weight")
    assert heads.prunable and heads.size == 2
    stream = _group_with(dep, "conv_proj.weight")
    assert stream.prunable and any(s.param == "pos_encoding.class_token" for s in stream.sites)


@pytest.mark.parametrize("target", [0.6, 0.35])
def test_tiny_mvit_prunes_to_the_target(target: float) -> None:
    """torch's exporter cannot translate MViT itself (ONNX Runtime fails on the original model): the masked
    oracle is the check."""
    model = _tiny_mvit()
    r = _compile(model, XM, target, verify=False)
    assert r.flops_after <= target * r.flops_before * 1.01
    heads = [int(h) for h in re.findall(r"reshape\(\w+, \w+, 3, (\d+), \d+\)", r.graph_module.code)]
    assert heads and heads == [
        r.graph_module.get_submodule(f"blocks.{i}.attn.qkv").out_features // 3 // 8 for i in range(len(heads))
    ]
