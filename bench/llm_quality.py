"""Perplexity of a small Llama-style LM pruned without fine-tuning: fxprune against Torch-Pruning's LLM path.

    python bench/llm_quality.py                   # full run (trains ~3 min on 1 thread, then prunes)
    python bench/llm_quality.py --quick           # smoke run (tiny model, a few steps; well under a minute)
    python bench/llm_quality.py --threads 1 --targets 0.7 0.5 --steps 800 --out bench/results/llm_quality.json

Issue 17's quality acceptance. Everything ships with Python; nothing is downloaded:

1. **Data**: the text of the Python standard library's ``.py`` files (``sysconfig.get_paths()["stdlib"]``,
   ``site-packages`` excluded), a fixed sorted file list split *by file* into train / calibration / test by a
   CRC-32 of the relative path (1/20 test, 1/20 calibration, the rest train), byte-level tokens (vocabulary
   256), files joined by a NUL byte; each file contributes at most ``--max-file-bytes`` and each split is
   capped (``--train-bytes``, ``--calib-bytes``, ``--test-bytes``), files taken in CRC order so that a cap
   keeps a spread of modules. Nothing is written into the repository.
2. **Model**: ``transformers.LlamaForCausalLM`` (hidden 128, 4 layers, 8 query heads, 4 key/value heads:
   grouped-query attention, MLP 384, untied embeddings), trained from scratch with AdamW (linear warm-up, then
   cosine decay) on random windows of the train split for ``--steps`` steps, seeded. The trained weights are
   cached under ``bench/results/cache/`` (gitignored), keyed by the configuration, the steps and a hash of
   the data, so a rerun skips training.
3. **Evaluation**: perplexity ``exp(mean token loss)`` over non-overlapping windows of the test split (the
   causal-LM loss of ``labels=input_ids``, every window's ``L - 1`` predicted tokens weighted equally).
4. **fxprune** (``fxprune.hf.compile``, its model again a ``LlamaForCausalLM``; ``latency_runs=0``, the
   rest its defaults; unlabelled calibration token batches): the default (``score="auto"``, ``loss="auto"``:
   ``fisher`` on the next-token loss of the calibration tokens, least-squares compensation), ``influence``
   on the same loss, ``magnitude``, and ``loss="matching"`` (label-free output matching: ``auto`` is then
   ``magnitude``). Its ``target`` is a fraction of the blocks' FLOPs by its own count.
5. **Torch-Pruning 1.6** with the settings of its ``examples/LLMs/prune_llm.py``: ``MetaPruner``, L2
   magnitude importance with mean group reduction, one ratio for every layer (no global ranking), heads
   pruned whole (``num_heads`` of q/k/v, ``prune_num_heads``, no head-dim pruning, so the rotary tables
   stay), hidden size and MLP widths pruned at the same ratio, ``lm_head`` ignored, ``round_to=4``; the
   attention modules' head counts fixed up afterwards. That ratio is bisected so that the block FLOPs meet the
   target. On transformers 5 the dependency graph of this path never completes (rotate_half's slice/cat
   remaps the channel indices around a cycle through the attention, so its group never closes; the symptom
   of VainF/Torch-Pruning#527), so the run is cut after ``--tp-timeout`` seconds and recorded as failed.
   A second Torch-Pruning row keeps every other setting but ignores q/k/v/o (so only the MLP widths
   prune: the hidden size is coupled to ``o_proj``), which runs.

Block FLOPs are counted the same way for every model: ``torch.utils.flop_counter.FlopCounterMode`` over the
decoder layers (attention + MLP; norms count nothing) of one ``--seq-len`` window, on a copy with eager
attention (on CPU torch's counter counts the fused scaled-dot-product op as 0 FLOPs, which would hide the
attention scores; ``fxprune.hf`` counts it with torch's attention formula); a second column counts with
that fused op, i.e. without the scores. Torch-Pruning's ratio is matched on the first count. Prints a markdown table; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import re
import signal
import sysconfig
import time
import traceback
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).parent / "results"
VOCAB = 256
SEPARATOR = b"\x00"  # between files (never in the sources' text)
SPLITS = ("train", "calib", "test")


# --- data --------------------------------------------------------------------------------------------------


def split_of(rel: str) -> str:
    """The split of a file, from its path relative to the standard library's root: 1/20 each go to test and
    calibration by CRC-32 of the path (stable across machines and file-list changes), the rest to train."""
    r = zlib.crc32(rel.encode()) % 20
    return "test" if r == 0 else "calib" if r == 1 else "train"


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted POSIX paths, relative to ``root`` (the standard library's), of its ``.py`` files, without
    ``site-packages`` (installed packages differ between machines)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    rels = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(r.as_posix() for r in rels if "site-packages" not in r.parts)


@dataclass(frozen=True)
class TextData:
    """Byte tokens of each split (1-D ``int64`` tensors) and the files each was made of, in order."""

    tokens: dict[str, torch.Tensor]
    files: dict[str, list[str]]

    def sha(self) -> str:
        h = hashlib.sha256()
        for s in SPLITS:
            h.update(self.tokens[s].to(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:12]


def load_text(caps: dict[str, int], max_file_bytes: int, root: Path | None = None) -> TextData:
    """The standard library's text, split by file (``split_of``); each split at most ``caps[split]`` bytes.

    Within a split, files are taken in order of their CRC-32 (a fixed order spread over the modules), each
    truncated to ``max_file_bytes``, joined by ``SEPARATOR``, until the cap; the last one is cut at the cap.
    """
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in stdlib_files(root):
        by_split[split_of(rel)].append(rel)
    tokens, files = {}, {}
    for s in SPLITS:
        chunks, size, used = [], 0, []
        for rel in sorted(by_split[s], key=lambda r: (zlib.crc32(r.encode()) // 20, r)):
            if size >= caps[s]:
                break
            text = (root / rel).read_bytes()[:max_file_bytes] + SEPARATOR
            chunks.append(text)
            size += len(text)
            used.append(rel)
        data = b"".join(chunks)[: caps[s]]
        tokens[s] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        files[s] = used
    return TextData(tokens, files)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]`` of a token stream (the tail shorter than a window dropped)."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


# --- model and training ------------------------------------------------------------------------------------


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, seq_len: int) -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=max(256, seq_len),
        use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip


def train(model: torch.nn.Module, stream: torch.Tensor, steps: int, batch: int, seq_len: int, lr: float,
          seed: int) -> list[float]:  # fmt: skip
    """AdamW on random windows of ``stream``: linear warm-up over 5% of the steps, then cosine decay to 10%
    of ``lr``; gradients clipped at norm 1. Returns the loss every 50 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(float(loss))
    model.eval()
    return losses


def trained(args: argparse.Namespace, data: TextData) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model, from the cache when a run with the same configuration, steps and data made it."""
    import transformers

    config = llama_config(args.hidden, args.layers, args.heads, args.kv_heads, args.mlp, args.seq_len)
    key = json.dumps({"config": [args.hidden, args.layers, args.heads, args.kv_heads, args.mlp],
                      "seq_len": args.seq_len, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                      "seed": args.seed, "data": data.sha()}, sort_keys=True)  # fmt: skip
    cache = RESULTS / "cache" / f"llm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config)
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), {"cache": str(cache), "cached": True, "seconds": saved["seconds"],
                              "losses": saved["losses"]}  # fmt: skip
    t = time.perf_counter()
    losses = train(model, data.tokens["train"], args.steps, args.batch, args.seq_len, args.lr, args.seed)
    seconds = time.perf_counter() - t
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "seconds": seconds, "losses": losses, "key": key}, cache)
    return model.eval(), {"cache": str(cache), "cached": False, "seconds": seconds, "losses": losses}


# --- measurement -------------------------------------------------------------------------------------------


def perplexity(model: torch.nn.Module, wins: torch.Tensor, batch: int = 32) -> tuple[float, float]:
    """``(perplexity, mean token loss)`` of a causal LM over windows ``[N, L]``: the model's own loss of
    ``labels=input_ids`` (mean over a batch's ``B * (L - 1)`` predicted tokens), weighted by those counts, so
    every predicted token counts once whatever the batching."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), batch):
            x = wins[i : i + batch]
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    mean = total / count
    return math.exp(mean), mean


_LAYER = re.compile(r".*\.layers\.\d+")


def block_flops(model: torch.nn.Module, seq_len: int, attention: str = "eager") -> int:
    """FLOPs of the decoder layers (``*.layers.<i>``: attention and MLP) on one window of ``seq_len`` tokens,
    by ``FlopCounterMode``, on a copy with ``attention`` as its attention implementation: ``"eager"`` shows
    the counter the attention-score matmuls; under ``"sdpa"`` the fused CPU op counts as 0, so that count
    is of the projections and the MLP only (what ``fxprune.hf`` counts on CPU)."""
    m = copy.deepcopy(model).eval()
    m.set_attn_implementation(attention)
    x = torch.zeros(1, seq_len, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(input_ids=x)
    counts = counter.get_flop_counts()
    layers = [k for k in counts if _LAYER.fullmatch(k)]
    if not layers:
        raise RuntimeError(f"no decoder layer in the FLOPs count: {sorted(counts)}")
    return int(sum(sum(counts[k].values()) for k in layers))


def widths(model: Any) -> str:
    """Per decoder layer, the kept query heads / key-value heads / MLP width (``8/4/384 8/4/384 ...``)."""
    out = []
    for layer in model.model.layers:
        a, d = layer.self_attn, layer.self_attn.head_dim
        out.append(
            f"{a.q_proj.out_features // d}/{a.k_proj.out_features // d}/{layer.mlp.gate_proj.out_features}"
        )
    return " ".join(out)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TimeLimit(Exception):
    """Raised in the main thread when ``time_limit``'s seconds run out."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "the call") -> Iterator[None]:
    """Interrupt the body with ``TimeLimit`` (``"<what> did not finish in <seconds> s"``) after ``seconds``
    (SIGALRM: main thread, POSIX)."""

    def _raise(signum: int, frame: Any) -> None:
        raise TimeLimit(f"{what} did not finish in {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- fxprune -----------------------------------------------------------------------------------------------


def fx_prune(model: torch.nn.Module, target: float, calib: list[Any], score: str,
             loss: str = "auto") -> tuple[Any, float]:  # fmt: skip
    """``fxprune.hf.compile``'s pruned ``LlamaForCausalLM`` and its own block FLOPs ratio."""
    import fxprune.hf as fx_hf

    res = fx_hf.compile(model, target=target, data=calib, score=score, loss=loss, progress=False,
                        latency_runs=0)  # fmt: skip
    return res.model.eval(), float(res.block_flops_ratio)


# --- Torch-Pruning -----------------------------------------------------------------------------------------


def tp_prune(base: torch.nn.Module, ratio: float, x: torch.Tensor, heads: bool) -> torch.nn.Module:
    """A pruned copy of ``base`` by Torch-Pruning's LLM settings at ``ratio`` (module docstring, item 5);
    ``heads=False``: q/k/v/o ignored as well (only the MLP widths prune)."""
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    attn = [layer.self_attn for layer in model.model.layers]
    ignored: list[torch.nn.Module] = [model.lm_head]
    num_heads: dict[torch.nn.Module, int] = {}
    if heads:
        for a in attn:
            num_heads[a.q_proj] = model.config.num_attention_heads
            num_heads[a.k_proj] = num_heads[a.v_proj] = model.config.num_key_value_heads
    else:
        ignored += [p for a in attn for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]
    with warnings.catch_warnings():  # the RMSNorm weights are "unwrapped parameters": pruned on their one dim
        warnings.filterwarnings("ignore", "Unwrapped parameters", UserWarning)
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=heads, prune_head_dims=False, head_pruning_ratio=ratio if heads else 0.0,
            round_to=4,
        )  # fmt: skip
    pruner.step()
    # the attributes the pruned weights no longer match (transformers 5 reads num_key_value_groups and the
    # config's sizes; head_dim is unchanged: no head-dim pruning)
    cfg = model.config
    cfg.hidden_size = model.lm_head.in_features
    cfg.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    for a in attn:
        q_heads, kv_heads = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
        a.num_key_value_groups = q_heads // kv_heads
        cfg.num_attention_heads, cfg.num_key_value_heads = q_heads, kv_heads
    return model


def tp_at_target(base: torch.nn.Module, target: float, seq_len: int, heads: bool, timeout: float,
                 steps: int = 8) -> tuple[torch.nn.Module, float, float]:  # fmt: skip
    """Bisect Torch-Pruning's ratio in [0, 0.95] so that the block FLOPs (``block_flops``) are at most
    ``target`` of ``base``'s and as close to it as the bisection gets: ``(model, block FLOPs ratio, ratio)``.
    Each pruning run is cut after ``timeout`` seconds (``TimeLimit``)."""
    full = block_flops(base, seq_len)
    x = torch.zeros(1, 16, dtype=torch.long)
    lo, hi = 0.0, 0.95
    best: tuple[torch.nn.Module, float, float] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        with time_limit(timeout, "Torch-Pruning's MetaPruner"):
            m = tp_prune(base, mid, x, heads)
        r = block_flops(m, seq_len) / full
        if r <= target:
            best, hi = (m, r, mid), mid
        else:
            lo = mid
    if best is None:
        with time_limit(timeout, "Torch-Pruning's MetaPruner"):
            m = tp_prune(base, hi, x, heads)
        best = (m, block_flops(m, seq_len) / full, hi)
    return best


# --- main --------------------------------------------------------------------------------------------------

METHODS = ("fx_auto", "fx_influence", "fx_magnitude", "fx_matching", "tp_llm", "tp_llm_mlp_only")
LABELS = {
    "fx_auto": "fxprune default (fisher, next-token loss, lsq)",
    "fx_influence": "fxprune influence (next-token loss, lsq)",
    "fx_magnitude": "fxprune magnitude (lsq)",
    "fx_matching": "fxprune loss='matching' (magnitude, lsq)",
    "tp_llm": "Torch-Pruning LLM path (heads, hidden, MLP)",
    "tp_llm_mlp_only": "Torch-Pruning LLM path, q/k/v/o ignored (MLP only)",
}


def measure(model: torch.nn.Module, base: torch.nn.Module, test: torch.Tensor, seq_len: int,
            ppl0: float | None = None) -> dict[str, Any]:  # fmt: skip
    """A table row's measurements of ``model``: block FLOPs / ``base``'s (with and without the attention
    scores, ``block_flops``), parameters, test perplexity and mean token loss, perplexity increase over
    ``ppl0`` (default: its own)."""
    ppl, loss = perplexity(model, test)
    return {
        "block_flops_ratio": block_flops(model, seq_len) / block_flops(base, seq_len),
        "block_flops_ratio_no_scores": (
            block_flops(model, seq_len, "sdpa") / block_flops(base, seq_len, "sdpa")
        ),
        "params": n_params(model), "hidden": model.lm_head.in_features, "widths": widths(model),
        "perplexity": ppl, "loss": loss, "increase": ppl / (ppl0 or ppl) - 1,
    }  # fmt: skip


def run_method(method: str, model: torch.nn.Module, target: float, args: argparse.Namespace,
               calib: list[torch.Tensor]) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    if method.startswith("tp_"):
        pruned, _, ratio = tp_at_target(model, target, args.seq_len, method == "tp_llm", args.tp_timeout)
        return pruned, {"tp_ratio": ratio}
    score = {"fx_magnitude": "magnitude", "fx_influence": "influence"}.get(method, "auto")
    loss = "matching" if method == "fx_matching" else "auto"
    pruned, own = fx_prune(model, target, calib, score, loss)
    return pruned, {"fxprune_block_flops_ratio": own}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="*", type=float, default=[0.7, 0.5])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-bytes", type=int, default=8_000_000)
    ap.add_argument("--calib-bytes", type=int, default=32 * 8 * 128)
    ap.add_argument("--test-bytes", type=int, default=1024 * 128)
    ap.add_argument("--max-file-bytes", type=int, default=32_768)
    ap.add_argument("--calib-batch", type=int, default=8, help="calibration windows per batch")
    ap.add_argument("--tp-timeout", type=float, default=30.0, help="seconds per Torch-Pruning pruning run")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 oversubscribe a busy 2-core box)"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "llm_quality.json")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.mlp, args.steps, args.batch = 64, 2, 192, 30, 8
        args.train_bytes, args.calib_bytes, args.test_bytes = 400_000, 2 * 8 * args.seq_len, 64 * args.seq_len
        args.targets, args.tp_timeout = args.targets[:1], 5.0
        if args.out == RESULTS / "llm_quality.json":
            args.out = RESULTS / "llm_quality_quick.json"
    torch.set_num_threads(args.threads)
    caps = {"train": args.train_bytes, "calib": args.calib_bytes, "test": args.test_bytes}
    data = load_text(caps, args.max_file_bytes)
    test = windows(data.tokens["test"], args.seq_len)
    calib = list(windows(data.tokens["calib"], args.seq_len).split(args.calib_batch))
    model, info = trained(args, data)
    base = measure(model, model, test, args.seq_len)
    header = {
        "train_seconds": info["seconds"], "cached": info["cached"], "steps": args.steps, "seed": args.seed,
        "threads": args.threads, "load_at_start": os.getloadavg()[0],
        "tokens": {s: len(data.tokens[s]) for s in SPLITS}, "files": {s: len(data.files[s]) for s in SPLITS},
        "test_windows": len(test), "calib_batches": [list(b.shape) for b in calib], "data_sha": data.sha(),
        "python": platform.python_version(), "torch": torch.__version__,
        "final_train_loss": info["losses"][-1],
    }  # fmt: skip
    rows: list[dict[str, Any]] = [{"method": "unpruned", "target": 1.0, **base}]
    _print_header(header, info)
    print(_row_line(rows[0]), flush=True)
    tp_failed: dict[str, str] = {}  # a Torch-Pruning path that failed fails again at any ratio: tried once
    for method in args.methods:
        for target in args.targets:
            row: dict[str, Any] = {"method": method, "target": target}
            t = time.perf_counter()
            if method in tp_failed:
                row["failed"] = tp_failed[method]
            else:
                try:
                    pruned, extra = run_method(method, model, target, args, calib)
                    row.update(measure(pruned, model, test, args.seq_len, base["perplexity"]), **extra)
                except Exception as e:  # a failed tool is a row with its reason, not a crashed benchmark
                    row["failed"] = f"{type(e).__name__}: {e}".splitlines()[0]
                    if method.startswith("tp_"):
                        tp_failed[method] = row["failed"]
                    if not isinstance(e, TimeLimit):
                        traceback.print_exc()
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            print(_row_line(row), flush=True)
            _write(args, header, rows)
    header["load_at_end"] = os.getloadavg()[0]
    _write(args, header, rows)
    print()
    print(table(header, rows))
    print(f"\nwrote {args.out}")


def _write(args: argparse.Namespace, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config, "header": header, "rows": rows}, indent=1))


def _print_header(header: dict[str, Any], info: dict[str, Any]) -> None:
    how = "loaded from cache, trained" if info["cached"] else "trained"
    print(f"model {how} in {info['seconds']:.0f}s ({info['cache']}); losses every 50 steps: "
          f"{' '.join(f'{v:.2f}' for v in info['losses'])}", flush=True)  # fmt: skip


def table(header: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table, with a header line of the run's conditions."""
    tok = header["tokens"]
    lines = [
        f"Train {header['train_seconds']:.0f} s ({header['steps']} steps, seed {header['seed']}, "
        f"{header['threads']} threads, 1-min load {header['load_at_start']:.2f} at start, "
        f"{header.get('load_at_end', float('nan')):.2f} at end); stdlib bytes "
        f"train/calib/test {tok['train']}/{tok['calib']}/{tok['test']} from {header['files']['train']}/"
        f"{header['files']['calib']}/{header['files']['test']} files (Python {header['python']}, data "
        f"{header['data_sha']}); {header['test_windows']} test windows.",
        "",
        "| method | target | block FLOPs ratio | (without attention scores) | params | perplexity "
        "| increase vs unpruned | per layer: q heads/kv heads/MLP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = LABELS.get(r["method"], r["method"])
        if "failed" in r:
            lines.append(f"| {name} | {r['target']:.2f} | - | - | - | failed: {r['failed']} | - | - |")
            continue
        lines.append(f"| {name} | {r['target']:.2f} | {r['block_flops_ratio']:.3f} | "
                     f"{r['block_flops_ratio_no_scores']:.3f} | {r['params']:,} | "
                     f"{r['perplexity']:.3f} | {100 * r['increase']:+.1f}% | {r['widths']} |")  # fmt: skip
    return "\n".join(lines)


def _row_line(r: dict[str, Any]) -> str:
    return "  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


if __name__ == "__main__":
    main()
