"""bench/llm_quality.py: the data split, the perplexity, the FLOPs count and Torch-Pruning's FLOPs matching.
Skipped without ``transformers``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import load_bench

transformers = pytest.importorskip("transformers")


llm = load_bench("llm_quality")


def _tiny_llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = llm.llama_config(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, seq_len=32)
    return transformers.LlamaForCausalLM(config).eval()


def test_split_is_by_file_deterministic_and_disjoint() -> None:
    caps = {"train": 20_000, "calib": 5_000, "test": 5_000}
    a, b = llm.load_text(caps, 4096), llm.load_text(caps, 4096)
    for s in llm.SPLITS:
        assert a.files[s] == b.files[s] and torch.equal(a.tokens[s], b.tokens[s])
        assert a.files[s], f"the {s} split has files"
        assert all(llm.split_of(rel) == s for rel in a.files[s])
        assert len(a.tokens[s]) == caps[s]  # the standard library is larger than these caps
        assert a.tokens[s].dtype == torch.int64 and int(a.tokens[s].max()) < llm.VOCAB
    train, calib, test = (set(a.files[s]) for s in llm.SPLITS)
    assert not (train & calib or train & test or calib & test)
    assert a.sha() == b.sha()


def test_split_files_and_order(tmp_path: Path) -> None:
    """``site-packages`` is left out; the stream starts with the first file in CRC order, NUL-separated."""
    for rel in ("a.py", "pkg/b.py", "pkg/c.txt", "site-packages/d.py", *(f"m{i}.py" for i in range(60))):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(f"# {rel}\n".encode())
    files = llm.stdlib_files(tmp_path)
    assert files == sorted(files) and "pkg/b.py" in files
    assert "site-packages/d.py" not in files and "pkg/c.txt" not in files
    data = llm.load_text({"train": 10**6, "calib": 10**6, "test": 10**6}, 4096, root=tmp_path)
    assert sorted(f for s in llm.SPLITS for f in data.files[s]) == files
    first = data.files["train"][0]
    head = bytes(data.tokens["train"][: len(first) + 4].tolist())
    assert head == f"# {first}\n".encode() + llm.SEPARATOR


def test_perplexity_is_exp_of_the_mean_token_loss() -> None:
    model = _tiny_llama()
    wins = torch.randint(0, llm.VOCAB, (5, 16), generator=torch.Generator().manual_seed(1))
    ppl, loss = llm.perplexity(model, wins, batch=2)  # batches of 2, 2, 1 windows
    with torch.no_grad():
        logits = model(input_ids=wins).logits
    mean = F.cross_entropy(logits[:, :-1].reshape(-1, llm.VOCAB), wins[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(mean, rel=1e-5)
    assert ppl == pytest.approx(math.exp(mean), rel=1e-5)


def test_block_flops_counts_the_attention_scores_only_under_eager() -> None:
    model = _tiny_llama()
    L, hidden, mlp, heads, kv = 32, 64, 128, 4, 2
    head_dim = hidden // heads
    proj = 2 * L * hidden * (2 * hidden + 2 * kv * head_dim + 3 * mlp)  # q, o, k, v, and the MLP
    scores = 2 * 2 * L * L * head_dim * heads  # q @ k^T and attention @ v
    assert llm.block_flops(model, L, "sdpa") == 2 * proj
    assert llm.block_flops(model, L) == 2 * (proj + scores)
    assert model.config._attn_implementation != "eager"  # counted on a copy


def test_tp_flops_matching_lands_near_the_target() -> None:
    torch_pruning = pytest.importorskip("torch_pruning")
    assert torch_pruning is not None
    base = _tiny_llama()
    pruned, ratio, tp_ratio = llm.tp_at_target(base, 0.6, seq_len=32, heads=False, timeout=30.0)
    assert ratio == pytest.approx(llm.block_flops(pruned, 32) / llm.block_flops(base, 32))
    assert 0.55 <= ratio <= 0.6
    assert 0 < tp_ratio < 0.95
    assert pruned.model.layers[0].mlp.up_proj.out_features < 128
    assert base.model.layers[0].mlp.up_proj.out_features == 128  # the base model is never touched
    x = torch.randint(0, llm.VOCAB, (1, 8))
    assert pruned(input_ids=x).logits.shape == (1, 8, llm.VOCAB)


def test_time_limit_interrupts_a_loop_and_restores_the_alarm() -> None:
    with pytest.raises(llm.TimeLimit, match="the loop did not finish"), llm.time_limit(0.05, "the loop"):
        while True:
            pass
    with llm.time_limit(5.0):
        pass  # finished in time: no exception, and no alarm left behind
    import signal

    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
