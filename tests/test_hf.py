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


# ------------------------------------------------------------------------------------------- fxprune.hf
def _vit_classifier() -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)


def _qwen3() -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.Qwen3Config(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    return transformers.Qwen3ForCausalLM(config).eval(), torch.randint(0, 100, (1, 16))


def _token_data(lengths: tuple[int, ...], labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Batches of 2 rows of different lengths, right-padded inside each batch (attention_mask 0)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(1, 100, (2, n), generator=g)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n - 3 :] = 0  # the second row is 3 tokens shorter
        ids[1, n - 3 :] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        out.append(batch)
    return out


def _masked_user_model(res: Any) -> torch.nn.Module:
    overrides = res.result.compensation.overrides if res.result.compensation is not None else None
    masked = fxprune.masked_model(res.adapter, res.result.plan, overrides)
    return masked.model.eval()


def _max_rel(a: Any, b: Any) -> float:
    from fxprune.data import flatten_structure

    xs, ys = flatten_structure(a, torch.Tensor), flatten_structure(b, torch.Tensor)
    assert len(xs) == len(ys) and xs
    return max(
        float((x - y).abs().max()) / max(float(y.abs().max()), 1e-12) for x, y in zip(xs, ys, strict=True)
    )


_HF_MODELS = {"bert": _bert, "vit": _vit_classifier, "gpt2": _gpt2, "llama": _llama, "qwen3": _qwen3}


@pytest.mark.parametrize("name", list(_HF_MODELS))
def test_hf_compile_gives_the_users_class_back_smaller(name: str, tmp_path: Any) -> None:
    """Acceptance of issue 17 per model: 0.5 of the blocks' FLOPs, heads and MLP channels removed, equal to
    the masked original (also eagerly, at another sequence length), ONNX-checked, config updated, saved
    and loaded, and (decoders) the same 8 greedy tokens as the masked original."""
    import fxprune.hf as hf

    torch.manual_seed(0)
    model, x = _HF_MODELS[name]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    text = not x.is_floating_point()
    data = _token_data((16, 12, 9)) if text else None
    example = x if not text else None
    res = hf.compile(model, example, 0.5, data=data, score="magnitude", progress=False, latency_runs=0,
                     round_to=1)  # fmt: skip
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), (
        "the user's model is untouched"
    )
    assert type(res.model) is type(model)
    assert 0.40 <= res.block_flops_ratio <= 0.505, res.block_flops_ratio
    heads0 = model.config.num_attention_heads
    assert any(w["num_attention_heads"] < heads0 for w in res.widths), res.widths
    mlp0 = getattr(model.config, "intermediate_size", None) or 4 * model.config.hidden_size
    assert any(w["intermediate_size"] < mlp0 for w in res.widths), res.widths
    # the compiled graph equals the masked original; so does the rebuilt class, eagerly, at another length
    assert_masked_equivalent(res.adapter, res.result, res.example, rtol=1e-4)
    masked = _masked_user_model(res)
    probe = torch.randint(1, 100, (1, 11)) if text else torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert _max_rel(res.model(probe), masked(probe)) < 1e-4
    assert res.result.verification is not None and res.result.verification.passed
    # config: the pruned widths, and what from_pretrained needs
    assert res.model.config.num_attention_heads == max(w["num_attention_heads"] for w in res.widths)
    assert model.config.num_attention_heads == heads0, "the user's config is untouched"
    assert res.model.config.fxprune["layers"] == res.widths
    res.model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert _max_rel(loaded(probe), res.model(probe)) == 0.0
    if res.config_describes_model:  # the class's own loader needs no help
        plain = type(model).from_pretrained(tmp_path)
        with torch.no_grad():
            assert _max_rel(plain(probe), res.model(probe)) == 0.0
    if hasattr(model, "generate") and text:
        prompt = torch.randint(1, 100, (1, 5))
        kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        got = res.model.generate(prompt, **kw)
        want = masked.generate(prompt, **kw)
        assert got.shape[1] == 13 and torch.equal(got, want)


def test_hf_uniform_llama_loads_with_its_own_class(tmp_path: Any) -> None:
    """``uniform=True``: one count per layer, so ``LlamaForCausalLM.from_pretrained`` loads the save; the
    causal-LM loss with labels scores with fisher and compensates."""
    import fxprune.hf as hf

    torch.manual_seed(0)
    model, _ = _llama()
    # chunk=1: per-sample micro-batches, which an exported graph (one batch size) cannot run: whole batches
    res = hf.compile(model, None, 0.6, data=_token_data((16, 10, 14), labels=True), uniform=True, chunk=1,
                     progress=False, latency_runs=0, round_to=1)  # fmt: skip
    assert res.result.score == "fisher" and res.result.compensation is not None
    assert len({tuple(sorted(w.items())) for w in res.widths}) == 1, res.widths
    assert res.config_describes_model
    assert res.model.config.intermediate_size == res.widths[0]["intermediate_size"] < 128
    res.model.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    probe = torch.randint(1, 100, (1, 9))
    with torch.no_grad():
        assert _max_rel(plain(probe), res.model(probe)) == 0.0


def test_hf_bad_inputs_are_named() -> None:
    import fxprune.hf as hf
    from fxprune.errors import InputError

    model, x = _llama()
    with pytest.raises(InputError, match="units"):
        hf.compile(model, x, 0.5, units=("heads", "neurons"))
    with pytest.raises(InputError, match="max_length"):
        hf.compile(model, x, 0.5, data=[torch.randint(0, 100, (1, 20))])
    with pytest.raises(InputError, match="labels"):
        hf.compile(model, x, 0.5, data=[{"input_ids": x, "labels": x}, {"input_ids": x}])
    with pytest.raises(InputError, match="target_flops"):
        hf.compile(model, x, 0.5, target_flops=0.5)
    with pytest.raises(InputError, match="loss="):
        hf.compile(model, x, 0.5, loss="mse")
    with pytest.raises(InputError, match="not a causal LM or loss='matching'"):
        hf.compile(model, x, 0.5, data=[{"input_ids": x, "labels": x}], loss="matching")


def test_hf_hidden_units_say_why_they_are_pinned() -> None:
    """Hidden-size pruning is off by default; asked for alone on Llama (RMSNorm over the hidden size), it
    is refused with the reason; with other units it warns and prunes those."""
    import fxprune.hf as hf
    from fxprune.errors import InputError

    torch.manual_seed(0)
    model, x = _llama()
    with pytest.raises(InputError, match=r"hidden: .*(reduction|spans|packed)"):
        hf.compile(model, x, 0.5, units=("hidden",), score="magnitude", progress=False, latency_runs=0)
    with pytest.warns(UserWarning, match="no hidden channels"):
        res = hf.compile(model, x, 0.7, units=("mlp", "hidden"), score="magnitude", progress=False,
                         latency_runs=0, round_to=1)  # fmt: skip
    assert all(w["num_attention_heads"] == 4 for w in res.widths), "heads were not asked for"
    assert any(w["intermediate_size"] < 128 for w in res.widths)


def test_export_capture_refuses_calibration_batches_of_another_batch_size() -> None:
    """An exported graph is specialised to the example's shapes: a batch of another size is named with the
    fix, not a RuntimeError from inside the graph."""
    from fxprune.errors import InputError

    model, x = _llama()
    with pytest.raises(InputError, match=r"data\[1\] has batch size 2.*batch_size=1"):
        fxprune.compile(model, x, 0.6, data=[x, torch.randint(0, 100, (2, 16))], progress=False,
                        latency_runs=0)  # fmt: skip


def test_hf_second_order_scores_run_on_eager_attention_and_return_the_users_kernels() -> None:
    """torch has no double backward of the fused CPU attention: second-order scores capture the eager
    attention (the same function); the returned model has the user's attention implementation again."""
    import fxprune.hf as hf

    torch.manual_seed(0)
    model, x = _llama()
    assert model.config._attn_implementation == "sdpa"
    res = hf.compile(model, x, 0.6, score="grad_norm", progress=False, latency_runs=0, round_to=1)
    assert res.adapter.model.config._attn_implementation == "eager"
    assert res.model.config._attn_implementation == "sdpa"
    assert all(m.config is res.model.config for m in res.model.modules() if hasattr(m, "config"))
    assert model.config._attn_implementation == "sdpa", "the user's model is untouched"
    assert_masked_equivalent(res.adapter, res.result, res.example, rtol=1e-4)


_COMMON = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "max_position_embeddings": 64}  # fmt: skip
_MORE = {
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**_COMMON, num_key_value_heads=2)
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_COMMON, num_key_value_heads=2)
    ),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16)
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0)
    ),
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        )  # fmt: skip
    ),
    "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**_COMMON)),
    "distilbert": lambda: transformers.DistilBertModel(
        transformers.DistilBertConfig(
            vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64
        )  # fmt: skip
    ),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_COMMON)),
}


@pytest.mark.parametrize("name", list(_MORE))
def test_hf_more_architectures_compile_and_reload(name: str, tmp_path: Any) -> None:
    """Fused q/k/v (GPT-NeoX, Phi-3), gated MLPs (Mistral, Gemma 2, Phi-3's gate_up_proj), q/k norms and
    biases: the class comes back, equal to its masked original, ONNX-checked, saved and reloaded equal."""
    import fxprune.hf as hf

    torch.manual_seed(0)
    model, x = _MORE[name]().eval(), torch.randint(1, 100, (1, 16))
    res = hf.compile(model, x, 0.5, score="magnitude", progress=False, latency_runs=0, round_to=1)
    assert type(res.model) is type(model) and res.block_flops_ratio <= 0.505
    assert res.result.verification is not None and res.result.verification.passed
    assert_masked_equivalent(res.adapter, res.result, res.example, rtol=1e-4)
    assert any(w.get("intermediate_size", 10**9) < 128 for w in res.widths), res.widths
    res.model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path)
    with torch.no_grad():
        assert _max_rel(loaded(x), res.model(x)) == 0.0


def test_hf_causal_lm_scores_on_next_token_prediction_without_labels() -> None:
    """A causal LM's tokens are their own labels: ``loss="auto"`` scores on the causal-LM loss (fisher);
    ``loss="matching"`` on label-free output matching (magnitude); an encoder gets output matching."""
    import fxprune.hf as hf

    torch.manual_seed(0)
    model, _ = _llama()
    data = _token_data((16, 12))
    opts = {"progress": False, "latency_runs": 0, "round_to": 1}
    lm = hf.compile(model, None, 0.6, data=data, **opts)
    assert lm.result.score == "fisher" and lm.result.compensation is not None
    matching = hf.compile(model, None, 0.6, data=data, loss="matching", **opts)
    assert matching.result.score == "magnitude"
    assert lm.result.plan.kept != matching.result.plan.kept
    bert, _ = _bert()
    assert hf.compile(bert, None, 0.6, data=data, **opts).result.score == "magnitude"
