"""Attention: nn.MultiheadAttention (decomposed by CanonicalizePass), scaled_dot_product_attention heads,
class tokens and position embeddings, and the oracles on them (masked equivalence, ONNX Runtime)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent, assert_unchanged, snapshot
from fxprune.passes.dependency import DependencyPass, RuleContext, Tracked
from fxprune.passes.op_table import DEFAULT_TABLE
from fxprune.passes.rewrite import RewritePass, build_plan

import fxprune

E, H = 32, 4


def _informative_norms(model: nn.Module) -> nn.Module:
    """LayerNorm affine parameters away from (1, 0), so an oracle that ignores them cannot pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


class TinyViT(nn.Module):
    """Patchify conv, class token, position embedding, one pre-norm block (MHA + MLP), head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, E, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, E) * 0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, E) * 0.5)
        self.ln_1, self.ln_2, self.ln = nn.LayerNorm(E), nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))
        self.head = nn.Linear(E, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        y = self.ln_1(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        y, _ = self.attn(y, y, y, need_weights=False)
        if not self.batch_first:
            y = y.transpose(0, 1)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return self.head(self.ln(x)[:, 0])


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _group_with(dep: fxprune.DependencyResult, param: str, role: str) -> fxprune.ChannelGroup:
    hits = [g for g in dep.groups if any(s.param == param and s.role == role for s in g.sites)]
    assert len(hits) == 1, f"{param} ({role}) in {len(hits)} groups"
    return hits[0]


def _compile(model: nn.Module, x: torch.Tensor, target: float = 0.5) -> fxprune.CompileResult:
    snap = snapshot(model)
    r = fxprune.compile(model, x, target, latency_runs=0, score="magnitude", progress=False)
    assert_unchanged(model, snap)
    assert r.plan.removed_channels > 0
    assert r.verification is not None and r.verification.passed, r.verification
    assert fxprune.count_flops(r.graph_module, (x,)) == r.flops_after
    assert_masked_equivalent(model, r, x)
    return r


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_heads_and_embedding_width_are_groups(batch_first: bool) -> None:
    model = _informative_norms(TinyViT(batch_first)).eval()
    dep = fxprune.dependency_graph(model, X)
    heads = _group_with(dep, "attn.out_proj.weight", "in")
    assert heads.prunable and heads.size == H
    rows = sorted((s.offset, s.repeat) for s in heads.sites if s.param == "attn.in_proj_weight")
    assert rows == [(0, E // H), (E, E // H), (2 * E, E // H)]  # q, k and v rows of every head, together
    width = _group_with(dep, "patch.weight", "out")
    assert width.prunable and width.size == E
    sliced = {(s.param, s.role) for s in width.sites}
    assert {("class_token", "norm"), ("pos_embedding", "norm"), ("attn.in_proj_weight", "in")} <= sliced
    assert {("ln_1.weight", "stats"), ("attn.out_proj.weight", "out"), ("head.weight", "in")} <= sliced

    r = _compile(model, X)
    gm = r.graph_module
    kept_heads = len(r.plan.kept.get(heads.id, range(H)))
    kept_width = len(r.plan.kept.get(width.id, range(E)))
    assert kept_heads < H or kept_width < E
    assert gm.attn.in_proj_weight.shape == (3 * kept_heads * (E // H), kept_width)
    assert (gm.attn.num_heads, gm.attn.embed_dim) == (kept_heads, kept_width)
    assert gm.class_token.shape == (1, 1, kept_width) and gm.pos_embedding.shape == (1, 17, kept_width)
    exported = torch.export.export(gm, (X,)).module()
    torch.testing.assert_close(exported(X), gm(X))


class SdpaBlock(nn.Module):
    """Separate q/k/v projections, an explicit head split with permute, functional SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, E)
        self.q, self.k, self.v, self.out = (nn.Linear(E, E) for _ in range(4))
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.inp(x))
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, H, E // H).permute(0, 2, 1, 3) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.permute(0, 2, 1, 3).reshape(b, n, E)
        return self.head(F.gelu(self.out(o)))


def test_functional_sdpa_heads_tie_q_k_v_and_out_columns() -> None:
    x = torch.randn(2, 7, 6)
    dep = fxprune.dependency_graph(SdpaBlock().eval(), x)
    heads = _group_with(dep, "out.weight", "in")
    assert heads.prunable and heads.size == H
    assert {(s.param, s.role, s.repeat) for s in heads.sites} == {
        *((f"{p}.weight", "out", E // H) for p in "qkv"),
        *((f"{p}.bias", "out", E // H) for p in "qkv"),
        ("out.weight", "in", E // H),
    }
    r = _compile(SdpaBlock().eval(), x, target=0.6)
    assert r.graph_module.q.out_features == r.graph_module.out.in_features


class SingleHead(nn.Module):
    """SDPA over 3-d q/k/v: the features are contracted in q k^T, and v's features reach the output."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))


def test_sdpa_pins_contracted_features_and_passes_value_features() -> None:
    x = torch.randn(2, 5, 6)
    dep = fxprune.dependency_graph(SingleHead().eval(), x)
    for p in ("q", "k"):
        reasons = " ".join(_group_with(dep, f"{p}.weight", "out").pinned)
        assert "scaled_dot_product_attention contracts the" in reasons
    v = _group_with(dep, "v.weight", "out")
    assert v.prunable and ("out.weight", "in") in {(s.param, s.role) for s in v.sites}
    _compile(SingleHead().eval(), x, target=0.8)


def _sdpa_without_key(ctx: RuleContext) -> Tracked | None:
    """A wrong rule: ties the heads of q and v but forgets k (so k's heads are chosen on their own)."""
    q, v = ctx.tracked(ctx.node.args[0]), ctx.tracked(ctx.node.args[2])
    assert q is not None and v is not None
    ctx.unify(q.segs, v.segs, "q and v only")
    return Tracked(q.dim, q.segs)


@pytest.mark.parametrize("broken", [False, True])
def test_oracle_catches_slicing_q_without_k(broken: bool) -> None:
    """Keep heads {1, 2} of q/v but heads {0, 3} of k: shapes still agree, the function does not."""
    table = DEFAULT_TABLE.replace(F.scaled_dot_product_attention, rule=_sdpa_without_key) if broken else None
    model, x = SdpaBlock().eval(), torch.randn(2, 7, 6)
    state = fxprune.ANALYSE.run(
        fxprune.CompileState(model=model, example_input=x, options=fxprune.CompileOptions())
    )
    gm = state.gm
    dep = DependencyPass(table=table)(gm)  # the groups of the (maybe broken) table's rules
    kept = {_group_with(dep, "q.weight", "out").id: (1, 2)}
    k_group = _group_with(dep, "k.weight", "out").id
    kept.setdefault(k_group, (0, 3))
    if not broken:
        assert list(kept) == [k_group]  # one group: k follows q
        kept = {k_group: (1, 2)}
    result = types.SimpleNamespace(
        graph_module=RewritePass(dep.groups, kept)(gm), plan=build_plan(dep.groups, kept), compensation=None
    )
    if broken:
        with pytest.raises(AssertionError, match="pruned differs from masked original"):
            assert_masked_equivalent(model, result, x)  # type: ignore[arg-type]
    else:
        assert_masked_equivalent(model, result, x)  # type: ignore[arg-type]


class TokenModel(nn.Module):
    """Class token and position embedding on a linear token stream; ``literal`` expands with a size."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.embed, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.class_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 6, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        c = self.class_token.expand(t.shape[0], 1, 16) if self.literal else self.class_token.expand(2, -1, -1)
        t = F.relu(torch.cat([c, t], dim=1) + self.pos)
        return self.head(t.mean(1))


def test_class_token_and_position_embedding_slice_with_the_width() -> None:
    x = torch.randn(2, 5, 6)
    g = _group_with(fxprune.dependency_graph(TokenModel().eval(), x), "embed.weight", "out")
    assert g.prunable
    assert {(s.param, s.dim, s.role) for s in g.sites if s.param in ("class_token", "pos")} == {
        ("class_token", 2, "norm"),
        ("pos", 2, "norm"),
    }
    r = _compile(TokenModel().eval(), x, target=0.6)
    assert r.graph_module.class_token.shape[2] == r.graph_module.embed.out_features < 16
    pinned = _group_with(fxprune.dependency_graph(TokenModel(literal=True).eval(), x), "embed.weight", "out")
    assert "untracked tensor 'expand' in cat" in " ".join(pinned.pinned)


class LearnedChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(12, 2, 1)
        self.extra = nn.Parameter(torch.randn(1, 4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cat([F.relu(self.a(x)), self.extra.expand(x.shape[0], -1, -1, -1)], 1))


def test_parameter_concatenated_along_the_channels_is_a_producer() -> None:
    x = torch.randn(2, 3, 8, 8)
    g = _group_with(fxprune.dependency_graph(LearnedChannels().eval(), x), "extra", "out")
    assert g.prunable and g.size == 4
    r = _compile(LearnedChannels().eval(), x, target=0.5)
    assert r.graph_module.b.in_channels == r.graph_module.a.out_channels + r.graph_module.extra.shape[1]


class MaskedMha(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.inp, self.attn, self.out = (
            nn.Linear(6, E),
            nn.MultiheadAttention(E, H, batch_first=True),
            nn.Linear(E, 3),
        )
        self.register_buffer("mask", torch.zeros(5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        if self.mode == "unbatched":
            return self.out(self.attn(y, y, y, need_weights=False)[0])
        if self.mode == "mask":
            o, _ = self.attn(y, y, y, attn_mask=self.mask, need_weights=False)
            return self.out(o)
        o, w = self.attn(y, y, y)
        return self.out(o) + w.sum()


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("mask", "attention mask"),
        ("weights", "the attention weights are used"),
        ("unbatched", "unbatched (2-d) query"),
    ],
)
def test_mha_that_cannot_be_decomposed_pins_with_the_reason(mode: str, why: str) -> None:
    x = torch.randn(5, 6) if mode == "unbatched" else torch.randn(2, 5, 6)
    model = MaskedMha(mode).eval()
    g = _group_with(fxprune.dependency_graph(model, x), "inp.weight", "out")
    assert f"nn.MultiheadAttention 'attn' kept whole ({why})" in " ".join(g.pinned)
    r = fxprune.compile(model, x, 1.0, score="magnitude", progress=False, latency_runs=0)  # still compiles
    torch.testing.assert_close(r.graph_module(x), model(x), rtol=0, atol=0)


class CrossMha(nn.Module):
    """Queries from ``x``, keys and values from ``z``: cross-attention, with ``kdim``/``vdim`` when given.

    ``hidden`` is a prunable MLP in front of the query projection, so the model compiles below 1.0."""

    def __init__(self, kv_dim: int | None) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 6))
        self.q_in, self.kv_in = nn.Linear(6, E), nn.Linear(4, kv_dim or E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, kdim=kv_dim, vdim=kv_dim)
        self.out = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        kv = self.kv_in(z)
        return self.out(self.attn(self.q_in(self.hidden(x)), kv, kv, need_weights=False)[0])


@pytest.mark.parametrize("kv_dim", [None, 10], ids=["cross-attention", "kdim-vdim"])
def test_cross_attention_and_kdim_vdim_keep_the_module_and_pin(kv_dim: int | None) -> None:
    """README ("Attention"): cross-attention and kdim/vdim calls keep ``nn.MultiheadAttention`` whole and
    pin the channels it reads, with the reason; the rest of the model still prunes and verifies.

    A kdim/vdim module is only callable with keys of another width than the queries, so its calls are
    cross-attention too and ``passes/canonical.py`` names that reason first."""
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(2, 5, 6, generator=g), torch.randn(2, 7, 4, generator=g)
    model = CrossMha(kv_dim).eval()
    assert model.attn._qkv_same_embed_dim == (kv_dim is None)
    dep = fxprune.dependency_graph(model, (x, z))
    why = "nn.MultiheadAttention 'attn' kept whole (query, key and value are not one tensor)"
    for producer in ("q_in.weight", "kv_in.weight"):
        assert why in " ".join(_group_with(dep, producer, "out").pinned), producer
    assert _group_with(dep, "hidden.0.weight", "out").prunable
    snap = snapshot(model)
    r = fxprune.compile(model, (x, z), 0.95, latency_runs=0, score="magnitude", progress=False)
    assert_unchanged(model, snap)
    assert r.plan.removed_channels > 0 and "hidden.0" in r.plan.modules
    assert not {"attn", "kv_in", "out"} & set(r.plan.modules) and "out" not in r.plan.modules.get("q_in", {})
    assert isinstance(r.graph_module.get_submodule("attn"), nn.MultiheadAttention)  # not decomposed
    pruned_attn = dict(r.graph_module.get_submodule("attn").named_parameters())
    assert {k: v.shape for k, v in pruned_attn.items()} == {
        k: v.shape for k, v in model.attn.named_parameters()
    }
    assert r.verification is not None and r.verification.passed, r.verification
    assert_masked_equivalent(model, r, (x, z))


def test_count_flops_counts_multihead_attention() -> None:
    """The MHA inference fast path is one fused op that FlopCounterMode counts as 0."""
    model = TinyViT().eval()
    with torch.no_grad():
        total = fxprune.count_flops(model, (X,))
    r = fxprune.compile(model, X, 1.0, latency_runs=0, score="magnitude", progress=False, verify=False)
    assert total == r.flops_before == fxprune.count_flops(r.graph_module, (X,))
    attention = 2 * 2 * H * 17 * 17 * (E // H) * 2  # q k^T and attn v, batch 2
    linear_only = fxprune.count_flops(nn.Sequential(model.attn.out_proj), (torch.randn(2, 17, E),))
    assert total > attention + 4 * linear_only


class EinsumAttention(nn.Module):
    """Attention written with einsum and matmul; ``proj`` is an einsum against a weight (a linear)."""

    def __init__(self, use_matmul: bool) -> None:
        super().__init__()
        self.use_matmul = use_matmul
        self.inp, self.qkv, self.head = nn.Linear(6, E), nn.Linear(E, 3 * E), nn.Linear(E, 3)
        self.proj = nn.Parameter(torch.randn(E, E) / E**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.inp(x))
        b, n, _ = x.shape
        qkv = self.qkv(x).split([E, E, E], -1)
        q, k, v = (qkv[i].reshape(b, n, H, E // H).transpose(1, 2) for i in range(3))
        if self.use_matmul:
            o = (q @ k.transpose(-2, -1) * (E // H) ** -0.5).softmax(-1) @ v
        else:
            a = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
            o = torch.einsum("bhij,bhjd->bhid", a, v)
        o = torch.einsum("bnc,cf->bnf", o.transpose(1, 2).reshape(b, n, E), self.proj)
        return self.head(F.gelu(o))


@pytest.mark.parametrize("use_matmul", [False, True])
def test_einsum_and_matmul_attention(use_matmul: bool) -> None:
    x = torch.randn(2, 7, 6)
    dep = fxprune.dependency_graph(EinsumAttention(use_matmul).eval(), x)
    heads = _group_with(dep, "proj", "in")
    assert heads.prunable and heads.size == H  # heads: q/k/v rows of qkv, rows of proj
    assert sorted(s.offset for s in heads.sites if s.param == "qkv.weight") == [0, E, 2 * E]
    out = _group_with(dep, "proj", "out")  # the einsum against a weight creates channels, like a linear
    assert out.prunable and ("head.weight", "in") in {(s.param, s.role) for s in out.sites}
    _compile(EinsumAttention(use_matmul).eval(), x, target=0.6)


def test_product_of_two_activations_over_the_channels_pins() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bnc,bmc->bnm", self.a(x), self.b(x))

    g = _group_with(fxprune.dependency_graph(M().eval(), torch.randn(2, 5, 6)), "a.weight", "out")
    assert "product contracts the channels of two activations" in " ".join(g.pinned)


class _RotaryGQA(nn.Module):
    """Llama-style attention: rotary embeddings on q and k (``rotate_half``: halves of the head dim),
    grouped-query attention by ``repeat_kv`` (unsqueeze, expand, reshape) or ``enable_gqa``."""

    def __init__(self, gqa: str, d: int = 64, heads: int = 4, kv: int = 2, hd: int = 16) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, heads * hd), nn.Linear(d, kv * hd)
        self.v, self.o = nn.Linear(d, kv * hd), nn.Linear(heads * hd, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gqa, self.hd, self.rep = gqa, hd, heads // kv
        angle = torch.arange(8)[:, None] * torch.linspace(0.1, 1.0, hd // 2)[None]
        self.register_buffer("cos", torch.cat([angle, angle], -1).cos())
        self.register_buffer("sin", torch.cat([angle, angle], -1).sin())

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        half = torch.cat([-x[..., self.hd // 2 :], x[..., : self.hd // 2]], dim=-1)
        return x * self.cos + half * self.sin

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, hd = x.shape
        return x[:, :, None].expand(b, h, self.rep, t, hd).reshape(b, h * self.rep, t, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._rope(self.q(x).view(b, t, -1, self.hd).transpose(1, 2))
        k = self._rope(self.k(x).view(b, t, -1, self.hd).transpose(1, 2))
        v = self.v(x).view(b, t, -1, self.hd).transpose(1, 2)
        if self.gqa == "repeat_kv":
            a = F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v), is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return h + self.down(F.relu(self.up(h)))


@pytest.mark.parametrize("gqa", ["repeat_kv", "enable_gqa"])
def test_grouped_query_heads_with_rotary_embeddings_prune_by_key_value_group(gqa: str) -> None:
    """A key/value head and its query heads are one channel of one group (rotary embeddings and the head
    repeat followed); pruning it removes query heads ``2j, 2j+1`` with key/value head ``j``."""
    torch.manual_seed(0)
    model, x = _RotaryGQA(gqa).eval(), torch.randn(2, 8, 64)
    dep = fxprune.dependency_graph(model, x)
    heads = [g for g in dep.groups if set(g.producers) >= {"q", "k", "v"}]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 2, [
        (g.size, g.producers, g.pinned) for g in dep.groups
    ]
    r = fxprune.compile(model, x, 0.55, score="magnitude", latency_runs=0, progress=False, round_to=1)
    assert r.plan.kept.get(heads[0].id) is not None and len(r.plan.kept[heads[0].id]) == 1
    (kv,) = r.plan.kept[heads[0].id]
    assert r.plan.modules["q"]["out"] == tuple(range(kv * 32, kv * 32 + 32))  # two query heads of 16
    assert r.plan.modules["k"]["out"] == tuple(range(kv * 16, kv * 16 + 16))
    assert_masked_equivalent(model, r, x, rtol=1e-4)
