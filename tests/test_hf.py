"""Hugging Face transformers models (the ``hf`` extra) through the torch.export capture path: tiny configs,
random init, no downloads. Skipped without ``transformers``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_masked_equivalent

import fxprune
from fxprune.capture import EXPORT
from fxprune.data import output_signature

transformers = pytest.importorskip("transformers")


def _compile(model: torch.nn.Module, x: torch.Tensor) -> fxprune.CompileResult:
    return fxprune.compile(model, x, 0.5, score="magnitude", latency_runs=0, progress=False, round_to=1)


def _bert() -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config).eval(), torch.randint(0, 100, (1, 16))


def _vit() -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128,
    )  # fmt: skip
    return transformers.ViTModel(config).eval(), torch.randn(1, 3, 32, 32)


def _llama() -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 100, (1, 16))


def _gpt2() -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32, use_cache=False
    )
    return transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, 100, (1, 16))


@pytest.mark.parametrize("build", [_bert, _vit], ids=["bert", "vit"])
def test_encoders_compile_through_export_with_heads_pruned(build: Any) -> None:
    torch.manual_seed(0)
    model, x = build()
    result = _compile(model, x)
    assert result.capture == EXPORT  # symbolic tracing fails on transformers 5's forward
    assert result.flops_ratio <= 0.52
    assert result.verification is not None and result.verification.passed
    heads = model.config.num_attention_heads
    kept = [
        len(result.plan.kept[g.id])
        for g in result.dependency.groups
        if g.size == heads and g.id in result.plan.kept
    ]
    assert kept and all(k < heads for k in kept), "some attention heads are removed"
    with torch.no_grad():  # the ModelOutput keeps its class and fields
        assert output_signature(result.graph_module(x)) == output_signature(model(x))
    assert_masked_equivalent(model, result, x, rtol=1e-4)


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_decoders_compile_through_export_and_equal_their_masked_original(build: Any) -> None:
    """Llama (grouped-query attention, rotary embeddings) and GPT-2 (``Conv1D``: ``torch.addmm``): their MLP
    widths prune; where the rules cannot follow the heads (the rotary tables; attention scores), they are
    pinned, never cut wrong."""
    torch.manual_seed(0)
    model, x = build()
    result = fxprune.compile(model, x, 0.6, score="magnitude", latency_runs=0, progress=False, round_to=1)
    assert result.capture == EXPORT
    mlp = getattr(model.config, "intermediate_size", None) or 4 * model.config.n_embd
    kept = [
        len(result.plan.kept[g.id])
        for g in result.dependency.groups
        if g.size == mlp and g.id in result.plan.kept
    ]
    assert kept and all(k < mlp for k in kept), "the MLP widths are pruned"
    assert result.verification is not None and result.verification.passed
    assert_masked_equivalent(model, result, x, rtol=1e-4)
