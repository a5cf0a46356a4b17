"""Hugging Face transformers models (the ``hf`` extra): prune attention heads and MLP widths and get the
user's model class back, config updated, ready for ``save_pretrained`` and ``generate()``.

    res = fxprune.hf.compile(model, target=0.5, data=token_batches)
    res.model                       # the same class as ``model``, physically smaller
    res.model.save_pretrained(path)
    fxprune.hf.from_pretrained(path)  # any result; ``LlamaForCausalLM.from_pretrained(path)`` when
                                      # ``res.config_describes_model`` (one width per layer, explicit head_dim)

How it works:

1. **Capture.** The model is called with keyword arguments (``input_ids``/``pixel_values`` and the
   ``attention_mask``, ``use_cache=False``) by a small adapter module, captured through the torch.export path
   (``fxprune.capture``): transformers 5 models are written for it. Shapes are the example's, so every
   calibration batch is padded to it (below).
2. **Units.** A channel group is *heads* when its producers emit whole heads (``attention_units``: with
   grouped-query attention a key/value head and its query heads), *hidden* when it spans several blocks or
   parameters outside them (the residual stream; pinned in pre-norm models by the norms' statistics), else
   *mlp*. ``units=`` picks the kinds selection may cut; ``uniform=True`` keeps one count per kind in every
   block (``fxprune.select.select(bundles=)``), so the standard config fields describe the model.
3. **Scoring on tokens.** ``data`` is token batches: ``[B, L]`` id tensors or dicts with ``input_ids`` and
   optionally ``attention_mask`` and ``labels``, of any lengths. Every row is right-padded to the example's
   length (``attention_mask`` 0, ``labels`` -100) and rows are regrouped to the example's batch size.
   ``loss="auto"``: a causal LM (``model.can_generate()``) is scored on the causal-LM loss over the
   labelled tokens, the ``labels`` given or else the tokens themselves (next-token prediction needs no
   labels); any other model on the label-free output matching over the unpadded tokens.
   ``loss="matching"`` forces the latter. ``score="auto"`` is ``fisher`` on the causal-LM loss and
   ``magnitude`` on output matching (whose per-sample gradient is zero at the unpruned model). On the
   stdlib bench (``bench/llm_quality.py``) magnitude on output matching cut most heads and lost far more
   perplexity than fisher on the next-token loss.
4. **The target** is a fraction of the FLOPs of the blocks (the children of the model's longest
   ``nn.ModuleList``: its attention and MLP layers), counted by ``torch.utils.flop_counter``; the
   embeddings and the head are not counted in it (but are in ``res.result``'s whole-graph figures).
5. **The result.** A copy of the user's model receives the pruned parameters of the compiled graph by
   qualified name; the attributes the forward reads (``split_size`` of GPT-2, ``nf`` of ``Conv1D``, the
   head counts) are set from the new shapes; the config gets the new widths (``num_attention_heads``,
   ``num_key_value_heads``, ``intermediate_size``; ``head_dim`` kept explicit) and, in ``config.fxprune``,
   the original values, the per-layer widths and every changed parameter's shape, which
   ``from_pretrained`` uses to rebuild the shapes before loading the weights. The rebuilt model is run
   against the compiled graph on the example: a model whose forward the rebuild does not know raises
   ``FxpruneError`` rather than coming back wrong (``res.result.graph_module`` is the pruned model then).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.compiler import compile as _compile
from fxprune.data import ChannelGroup, flatten_structure
from fxprune.errors import FxpruneError, InputError, warn
from fxprune.passes.score import auto_score
from fxprune.stages import COMPILE, CompileResult, CompileState, Select, Units
from fxprune.trace import flop_counter

__all__ = ["KINDS", "HFResult", "block_flops", "compile", "from_pretrained", "group_kinds"]

KINDS = ("heads", "mlp", "hidden")
_ADAPTER = "model."  # the user's model inside the adapter
_IGNORE = -100  # labels of padded tokens (transformers' convention)
_SECOND_ORDER = ("influence", "grad_norm", "ifso_code", "sosp_h")  # scores that differentiate twice


class _Adapter(nn.Module):
    """Calls ``model`` with keyword arguments from positional tensors (what capture and ONNX see)."""

    def __init__(self, model: nn.Module, names: Sequence[str], extra: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.extra = dict(extra)

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)), **self.extra)


@dataclass
class HFResult:
    """What ``fxprune.hf.compile`` returns.

    Attributes:
        model: the pruned model, of the user's class, config updated (eval mode, CPU).
        result: the ``CompileResult`` of the captured graph (plan, scores, ONNX check, report).
        adapter: the module that was compiled: the original model called with ``input_names`` as keywords.
        input_names: the keyword of each example tensor.
        example: the example tensors the graph was captured with (``adapter(*example)``).
        block_flops_before, block_flops_after: FLOPs of the blocks on the example (torch's counter).
        widths: per block, the kept ``num_attention_heads``, ``num_key_value_heads`` and
            ``intermediate_size`` (the ones the block has).
        config_describes_model: whether the standard config fields alone describe the pruned model (one width
            per layer and an explicit ``head_dim``), so the class's own ``from_pretrained`` loads it.
    """

    model: nn.Module
    result: CompileResult
    adapter: nn.Module
    input_names: tuple[str, ...]
    example: tuple[torch.Tensor, ...]
    block_flops_before: int
    block_flops_after: int
    widths: list[dict[str, int]]
    config_describes_model: bool

    @property
    def block_flops_ratio(self) -> float:
        return self.block_flops_after / self.block_flops_before


# ----------------------------------------------------------------------------------------------- blocks
def _blocks(model: nn.Module) -> str:
    """Qualified name of the model's longest ``nn.ModuleList`` (its transformer layers)."""
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise InputError(
            f"{type(model).__name__} has no nn.ModuleList of layers; fxprune.hf prunes transformer blocks. "
            "Use fxprune.compile for other models"
        )
    return max(lists, key=lambda t: (t[0], -len(t[1])))[1]


def block_flops(model: nn.Module, kwargs: Mapping[str, Any]) -> list[int]:
    """FLOPs of each block (``_blocks``) of ``model`` called with ``kwargs`` (torch's counter)."""
    path = _blocks(model)
    n = len(model.get_submodule(path))  # type: ignore[arg-type]
    with torch.no_grad(), flop_counter(per_module=True) as counter:
        model(**kwargs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return [int(sum(counts.get(f"{root}.{path}.{i}", {}).values())) for i in range(n)]


def group_kinds(groups: Sequence[ChannelGroup], blocks: str, prefix: str = "") -> dict[int, tuple[str, int]]:
    """Group id -> (kind, block index; -1 for hidden) of every group (see the module doc)."""
    out: dict[int, tuple[str, int]] = {}
    head = f"{prefix}{blocks}."
    for g in groups:
        where = set()
        for s in g.sites:
            rest = s.param[len(head) :] if s.param.startswith(head) else None
            idx = rest.split(".", 1)[0] if rest else None
            where.add(int(idx) if idx is not None and idx.isdigit() else -1)
        if -1 in where or len(where) != 1:
            out[g.id] = ("hidden", -1)
        elif any(s.role == "out" and s.repeat > 1 for s in g.sites):
            out[g.id] = ("heads", where.pop())
        else:
            out[g.id] = ("mlp", where.pop())
    return out


def _units(kinds: Sequence[str], uniform: bool, blocks: str) -> Any:
    def units(state: CompileState) -> Units:
        kinds_of = group_kinds(state.dep.groups, blocks, _ADAPTER)
        prunable = {g.id for g in state.dep.groups if g.prunable}
        found = {g: kb for g, kb in kinds_of.items() if g in prunable}
        allowed = frozenset(g for g, (k, _) in found.items() if k in kinds)
        missing = [k for k in kinds if not any(kb[0] == k for kb in found.values())]
        if missing:
            why = {
                k: next(
                    (g.pinned[0] for g in state.dep.groups if kinds_of[g.id][0] == k and g.pinned),
                    "none found",
                )
                for k in missing
            }
            text = "; ".join(f"{k}: {why[k]}" for k in missing)
            if not allowed:
                raise InputError(f"units={kinds!r}: nothing of these kinds can be pruned ({text}); "
                                 f"choose among the kinds this model has, e.g. units=('heads', 'mlp')")  # fmt: skip
            warn(f"units: no {', '.join(missing)} channels can be pruned in this model ({text})")
        bundles: list[tuple[int, ...]] = []
        if uniform:
            sizes = {g.id: g.size for g in state.dep.groups}
            for kind in ("heads", "mlp"):
                per: dict[int, list[int]] = {}
                for g, (k, b) in sorted(found.items()):
                    if k == kind and g in allowed:
                        per.setdefault(b, []).append(g)
                counts = {len(v) for v in per.values()}
                if len(per) > 1 and len(counts) == 1:
                    for j in range(counts.pop()):
                        bundle = tuple(v[j] for _, v in sorted(per.items()))
                        if len({sizes[g] for g in bundle}) == 1:
                            bundles.append(bundle)
        return Units(allowed, tuple(bundles))

    return units


# ------------------------------------------------------------------------------------------------- data
def _rows(i: int, item: Any, input_name: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(ids, mask, labels) per row of batch ``i``, padding removed (trailing masked tokens dropped)."""
    if isinstance(item, torch.Tensor):
        item = {input_name: item}
    if not isinstance(item, Mapping) or input_name not in item:
        raise InputError(
            f"data[{i}] is a {type(item).__name__}; give token batches as [B, L] tensors of {input_name} or "
            f"dicts with '{input_name}' (and optionally 'attention_mask', 'labels')"
        )
    ids = torch.as_tensor(item[input_name])
    if ids.dim() == 1:
        ids = ids[None]
    mask = torch.as_tensor(item.get("attention_mask", torch.ones_like(ids)))
    labels = item.get("labels")
    labels = None if labels is None else torch.as_tensor(labels)
    for name, t in (("attention_mask", mask), ("labels", labels)):
        if t is not None and t.reshape(ids.shape[0], -1).shape != ids.shape:
            raise InputError(
                f"data[{i}]['{name}'] has shape {tuple(t.shape)} but '{input_name}' has {tuple(ids.shape)}; "
                "give one value per token"
            )
    mask, labels = mask.reshape(ids.shape), None if labels is None else labels.reshape(ids.shape)
    rows = []
    for r in range(ids.shape[0]):
        n = int(mask[r].nonzero().max()) + 1 if bool(mask[r].any()) else 0
        if n == 0:
            continue
        rows.append((ids[r, :n], mask[r, :n], None if labels is None else labels[r, :n]))
    return rows


def _pad(rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], batch: int, length: int,
         pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:  # fmt: skip
    """Rows regrouped into ``[batch, length]`` batches, right-padded; a short last batch gets rows of
    padding only (masked out, no labels)."""
    out = []
    for start in range(0, len(rows), batch):
        chunk = list(rows[start : start + batch])
        ids = torch.full((batch, length), pad_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        labelled = chunk[0][2] is not None
        labels = torch.full((batch, length), _IGNORE, dtype=torch.long) if labelled else None
        for r, (i, m, lab) in enumerate(chunk):
            ids[r, : len(i)], mask[r, : len(m)] = i, m
            if labels is not None and lab is not None:
                labels[r, : len(lab)] = lab
        out.append((ids, mask, labels))
    return out


def _causal_lm_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=_IGNORE
    )


def _masked_matching(out: Any, targets: tuple[list[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``1/(2B) * sum ||f(x) - f0(x)||^2`` over the unpadded tokens (outputs of shape ``[B, L, ...]``;
    other outputs whole): the label-free loss of ``fxprune.calib`` without the padding."""
    refs, mask = targets
    got = flatten_structure(out, torch.Tensor)
    total = got[0].new_zeros((), dtype=torch.float32) if got else torch.zeros(())
    for g, r in zip(got, refs, strict=True):
        d = (g.float() - r.float()) ** 2
        if d.dim() >= 2 and tuple(d.shape[:2]) == tuple(mask.shape):
            d = d * mask.reshape(*mask.shape, *([1] * (d.dim() - 2))).to(d.dtype)
        total = total + d.sum()
    return total / (2 * mask.shape[0])


# ----------------------------------------------------------------------------------------------- rebuild
def _out_width(m: Any) -> int:
    """Output features of an ``nn.Linear`` (weight ``[out, in]``) or a transformers ``Conv1D`` (``[in, out]``)."""
    return int(m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1])


# the query projection of an attention module, and how many head-widths of output it has per head
_QUERY = {"q_proj": 1, "query": 1, "q_lin": 1, "c_attn": 3, "query_key_value": 3}
# the MLP's first projection, and how many intermediate widths of output it has
_UP = {"up_proj": 1, "fc1": 1, "c_fc": 1, "lin1": 1, "dense_h_to_4h": 1, "gate_up_proj": 2}


def _heads(m: Any) -> tuple[int, int | None, int] | None:
    """``(query heads, key/value heads or None, head_dim)`` of an attention module, from its weights."""
    head_dim = next(
        (
            v
            for a in ("head_dim", "attention_head_size", "head_size")
            if isinstance(v := getattr(m, a, None), int)
        ),
        None,
    )
    name = next((n for n in _QUERY if isinstance(getattr(m, n, None), nn.Module)), None)
    if (
        head_dim is None
        or name is None
        or not isinstance(getattr(getattr(m, name), "weight", None), torch.Tensor)
    ):
        return None
    per = 1 if name == "c_attn" and getattr(m, "is_cross_attention", False) else _QUERY[name]
    heads = _out_width(getattr(m, name)) // per // head_dim
    k = getattr(m, "k_proj", None)
    kv = (
        _out_width(k) // head_dim if isinstance(k, nn.Linear) and hasattr(m, "num_key_value_groups") else None
    )
    return heads, kv, head_dim


def _mlp_width(m: Any) -> int | None:
    name = next((n for n in _UP if isinstance(getattr(m, n, None), nn.Module)), None)
    if name is None or not isinstance(getattr(getattr(m, name), "weight", None), torch.Tensor):
        return None
    return _out_width(getattr(m, name)) // _UP[name]


def _fix_attributes(model: nn.Module) -> None:
    """Set the attributes transformers' forwards read from the parameters' shapes."""
    m: Any
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and hasattr(m, "nf"):
            m.nf = int(w.shape[1])
        found = _heads(m)
        if found is not None:
            heads, kv, head_dim = found
            for attr in ("num_heads", "num_attention_heads", "n_heads"):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, heads)
            for attr in ("all_head_size", "split_size"):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, heads * head_dim)
            if kv:
                if isinstance(getattr(m, "num_key_value_heads", None), int):
                    m.num_key_value_heads = kv
                m.num_key_value_groups = heads // kv
        width = _mlp_width(m)
        if width is not None and isinstance(getattr(m, "intermediate_size", None), int):
            m.intermediate_size = width


def _widths(model: nn.Module, blocks: str) -> list[dict[str, int]]:
    """Per block: ``num_attention_heads``, ``num_key_value_heads`` (grouped-query attention) and
    ``intermediate_size``, read from the weights (the ones the block has)."""
    out = []
    layers: Any = model.get_submodule(blocks)
    for block in layers:
        w: dict[str, int] = {}
        for m in block.modules():
            found = _heads(m)
            if found is not None and "num_attention_heads" not in w:
                w["num_attention_heads"] = found[0]
                if found[1] is not None:
                    w["num_key_value_heads"] = found[1]
            width = _mlp_width(m)
            if width is None and type(m).__name__.endswith("Intermediate"):  # BERT, ViT: intermediate.dense
                dense = getattr(m, "dense", None)
                width = dense.out_features if isinstance(dense, nn.Linear) else None
            if width is not None and "intermediate_size" not in w:
                w["intermediate_size"] = width
        out.append(w)
    return out


_CONFIG_KEYS = {"num_attention_heads": ("num_attention_heads", "n_head", "n_heads"),
                "num_key_value_heads": ("num_key_value_heads",),
                "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim")}  # fmt: skip


def _update_config(config: Any, before: list[dict[str, int]], after: list[dict[str, int]],
                   shapes: dict[str, list[int]], head_dim: int | None) -> None:  # fmt: skip
    """Write the pruned widths into ``config``: one value per field when every block agrees, else the
    largest; ``head_dim`` made explicit when the heads change (so that a class reading
    ``config.head_dim`` does not derive it from the new head count); the original values, the per-block
    widths and every pruned parameter's shape in ``config.fxprune`` (for ``from_pretrained``)."""
    original: dict[str, Any] = {}
    changed: dict[str, int] = {}
    for key, names in _CONFIG_KEYS.items():
        values = {w[key] for w in after if key in w}
        if not values or values == {w[key] for w in before if key in w}:
            continue
        for name in names:  # every alias's value before any is set (GPT-2 maps n_head to num_attention_heads)
            if name in config.to_dict() or hasattr(config, name):
                original.setdefault(name, getattr(config, name, None))
                changed[name] = max(values)
    for name, value in changed.items():
        setattr(config, name, value)
    if (
        "num_attention_heads" in original
        and head_dim
        and not isinstance(getattr(config, "head_dim", None), int)
    ):
        config.head_dim = head_dim  # equal before and after: never restored
    config.fxprune = {"original": original, "layers": after, "shapes": shapes}


def _config_describes(model: nn.Module) -> bool:
    """Whether the class built from ``model.config`` alone (on the meta device, no fxprune entry) has
    ``model``'s parameter and buffer shapes: then its own ``from_pretrained`` loads the save."""
    config = copy.deepcopy(model.config)  # type: ignore[arg-type]
    if hasattr(config, "fxprune"):
        del config.fxprune
    try:
        with torch.device("meta"):
            cls: Any = type(model)
            probe = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    except Exception:  # a config the class cannot build from (a per-layer width it does not read)
        return False
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {k: tuple(v.shape) for k, v in probe.state_dict().items()} == want


def _rebuild(user: nn.Module, gm: nn.Module) -> tuple[nn.Module, dict[str, list[int]]]:
    """A copy of ``user`` with the compiled graph's parameters and buffers (by qualified name)."""
    new = copy.deepcopy(user)
    shapes: dict[str, list[int]] = {}
    own = dict(new.named_parameters(remove_duplicate=False)) | dict(new.named_buffers(remove_duplicate=False))
    for name, value in gm.state_dict().items():
        if not name.startswith(_ADAPTER) or name[len(_ADAPTER) :] not in own:
            continue
        uname = name[len(_ADAPTER) :]
        cur = own[uname]
        if cur.shape == value.shape and torch.equal(cur, value):
            continue
        owner, _, leaf = uname.rpartition(".")
        mod = new.get_submodule(owner)
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(value.detach().clone(), requires_grad=cur.requires_grad)
        else:
            mod._buffers[leaf] = value.detach().clone()
        if cur.shape != value.shape:
            shapes[uname] = list(value.shape)
    _fix_attributes(new)
    return new.eval(), shapes


def _outputs_equal(a: Any, b: Any, rtol: float) -> float:
    xs, ys = flatten_structure(a, torch.Tensor), flatten_structure(b, torch.Tensor)
    if len(xs) != len(ys):
        return math.inf
    worst = 0.0
    for x, y in zip(xs, ys, strict=True):
        if x.shape != y.shape:
            return math.inf
        scale = max(float(y.abs().max()), 1e-12) if y.numel() else 1.0
        worst = max(worst, float((x.float() - y.float()).abs().max()) / scale if x.numel() else 0.0)
    return worst


# ----------------------------------------------------------------------------------------------- compile
def compile(  # noqa: A001 - the module's entry point, like fxprune.compile
    model: nn.Module,
    example: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    target: float = 0.5,
    *,
    data: Iterable[Any] | None = None,
    units: Sequence[str] = ("heads", "mlp"),
    uniform: bool = False,
    score: str = "auto",
    max_length: int | None = None,
    batch_size: int = 4,
    loss: str = "auto",
    rtol: float = 1e-4,
    **options: Any,
) -> HFResult:
    """Prune ``model``'s blocks to about ``target`` of their FLOPs; return the user's class, smaller.

    Args:
        model: a transformers ``PreTrainedModel`` (never modified).
        example: the model's main input (``input_ids`` ``[B, L]``, ``pixel_values``...), or a dict of keyword
            tensors (``input_ids``, ``attention_mask``); default: ``[batch_size, L]`` from ``data`` (``L``
            its longest row, or ``max_length``). The captured graph's shapes are fixed by it: the rows of
            ``data`` are regrouped into batches of its ``B`` rows.
        target: fraction in (0, 1) of the blocks' FLOPs to keep.
        data: calibration token batches (see the module doc); default: the example only.
        units: what selection may cut among ``KINDS``: ``"heads"`` (whole attention heads; a key/value head
            with its query heads), ``"mlp"`` (MLP channels), ``"hidden"`` (the hidden size; off by default,
            and pinned with a reason in models that normalise over it, listed by ``res.result.inspect()``).
        uniform: every block keeps the same count of each kind (the config fields then describe the model).
        score: as in ``fxprune.compile``; ``"auto"``: ``fisher`` on the causal-LM loss, else ``magnitude``.
        loss: ``"auto"`` (the causal-LM loss for a causal LM, on its ``labels`` or its tokens; output
            matching for other models) or ``"matching"`` (label-free output matching).
        max_length: pad rows to this length (default: the longest row).
        batch_size: rows per calibration batch when ``example`` is not given (default 4: ``fisher``'s
            micro-batch; an exported graph runs at one batch size, so micro-batches are whole batches).
        rtol: tolerance of the rebuilt model against the compiled graph, and of the ONNX check.
        options: passed to ``fxprune.compile`` (``compensate=``, ``device=``, ``progress=``, ``verify=``...).

    Raises:
        InputError: a bad ``units`` / ``target`` / batch (named, with the fix), ``target_flops`` or
            ``target_latency`` in ``options``, labels for a model that is not a causal LM (or with
            ``loss="matching"``), an unknown ``loss``.
        FxpruneError: the rebuilt model does not compute what the compiled graph computes.
    """
    bad = [u for u in units if u not in KINDS]
    if bad or not units:
        raise InputError(f"units={tuple(units)!r}: choose among {KINDS}, e.g. units=('heads', 'mlp')")
    if not 0 < target < 1:
        raise InputError(f"target={target!r}: pass the fraction in (0, 1) of the blocks' FLOPs to keep")
    for key in ("target_flops", "target_latency", "submodules", "pipeline", "loss_fn"):
        if key in options:
            raise InputError(f"{key}= is not an option of fxprune.hf.compile; its target= is a fraction of the "
                             "blocks' FLOPs, its loss the causal-LM or output-matching one; use fxprune.compile")  # fmt: skip
    user = model
    blocks = _blocks(user)
    input_name = str(getattr(user, "main_input_name", "input_ids"))
    config = getattr(user, "config", None)
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = int(pad_id) if isinstance(pad_id, int) else 0

    rows = (
        [r for i, item in enumerate(data or []) for r in _rows(i, item, input_name)]
        if data is not None
        else []
    )
    if data is not None and not rows:
        raise InputError("data has no tokens (every row is fully masked); pass token batches")
    labelled = bool(rows) and rows[0][2] is not None
    if any((r[2] is not None) != labelled for r in rows):
        raise InputError("data mixes batches with and without 'labels'; give labels for all or none")
    if loss not in ("auto", "matching"):
        raise InputError(f"loss={loss!r}: pass 'auto' (the causal-LM loss for a causal LM) or 'matching'")
    causal = bool(getattr(user, "can_generate", lambda: False)())
    if labelled and (loss == "matching" or not causal):
        raise InputError(f"data has 'labels', used as causal-LM labels, but {type(user).__name__} is not a "
                         "causal LM or loss='matching'; drop the labels or use fxprune.compile(loss_fn=)")  # fmt: skip
    if rows and causal and loss == "auto" and not labelled:  # next-token prediction on the tokens themselves
        rows = [(ids, mask, ids.masked_fill(mask == 0, _IGNORE)) for ids, mask, _ in rows]
        labelled = True
    if isinstance(example, Mapping):
        kwargs = {k: torch.as_tensor(v) for k, v in example.items()}
    elif isinstance(example, torch.Tensor):
        kwargs = {input_name: example}
    elif rows:
        b = batch_size
        length = max_length or max(len(r[0]) for r in rows)
        kwargs = {input_name: torch.full((b, length), pad_id, dtype=torch.long),
                  "attention_mask": torch.ones((b, length), dtype=torch.long)}  # fmt: skip
    else:
        raise InputError("pass example= (the model's input, e.g. input_ids [B, L]) or data= (token batches)")
    main = kwargs[input_name]
    text = not main.is_floating_point()
    if text and rows and "attention_mask" not in kwargs:
        kwargs["attention_mask"] = torch.ones_like(main)
    if text and rows:
        length = main.shape[1]
        for i, r in enumerate(rows):
            if len(r[0]) > length:
                raise InputError(
                    f"a row of data has {len(r[0])} tokens but the example has {length}: pass max_length= "
                    f"or an example of at least that length (row {i})"
                )

    chosen = auto_score(labelled) if score == "auto" else score
    names = tuple(kwargs)
    sig = inspect.signature(user.forward).parameters
    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in sig else {}
    base = copy.deepcopy(user).eval()
    if chosen in _SECOND_ORDER and hasattr(base, "set_attn_implementation"):
        # torch has no double backward of its fused CPU attention kernels; the eager (matmul, softmax)
        # attention computes the same function and the rules follow its heads as well
        base.set_attn_implementation("eager")  # type: ignore[operator]
    adapter = _Adapter(base, names, extra).eval()
    example_t = tuple(kwargs[n] for n in names)

    batches: list[Any] | None = None
    if rows:
        b, length = main.shape
        batches = []
        for ids, mask, labels in _pad(rows, b, length, pad_id):
            feed = {input_name: ids, "attention_mask": mask}
            inputs = tuple(feed[n] if n in feed else kwargs[n] for n in names)
            if labels is not None:
                batches.append((inputs, labels))
            else:
                with torch.no_grad():
                    ref = [t.detach() for t in flatten_structure(adapter(*inputs), torch.Tensor)]
                batches.append((inputs, (ref, mask)))
    loss_fn = (_causal_lm_loss if labelled else _masked_matching) if batches else None

    per_block = block_flops(base, {**kwargs, **extra})
    blocks_total = sum(per_block)
    with torch.no_grad(), flop_counter() as counter:
        adapter(*example_t)
    total = counter.get_total_flops()
    absolute = total - (1 - target) * blocks_total
    pipeline = COMPILE.replace("select", Select(units=_units(tuple(units), uniform, blocks)))
    result = _compile(adapter, example_t, absolute, data=batches, loss_fn=loss_fn, score=chosen, rtol=rtol,
                      pipeline=pipeline, **options)  # fmt: skip
    assert isinstance(result, CompileResult)

    before = _widths(base, blocks)
    pruned, shapes = _rebuild(base, result.graph_module)
    with torch.no_grad():
        err = _outputs_equal(pruned(**kwargs, **extra), result.graph_module(*example_t), rtol)
    if err > rtol:
        raise FxpruneError(
            f"the rebuilt {type(user).__name__} differs from the compiled graph (max relative error {err:.3g}): "
            "its forward reads a width fxprune.hf does not set; result.graph_module of fxprune.compile(model, "
            "...) is the pruned model"
        )
    after = _widths(pruned, blocks)
    describes = True
    if config is not None:
        old, new = pruned.config, copy.deepcopy(config)
        head_dim = next((h[2] for m in base.modules() if (h := _heads(m)) is not None), None)
        _update_config(new, before, after, shapes, head_dim)
        for m in pruned.modules():  # the submodules' config is the model's (transformers shares one object)
            if getattr(m, "config", None) is old:
                m.config = new  # type: ignore[assignment]
        impl = getattr(config, "_attn_implementation", None)
        if (
            impl
            and hasattr(pruned, "set_attn_implementation")
            and getattr(old, "_attn_implementation", impl) != impl
        ):
            pruned.set_attn_implementation(impl)  # type: ignore[operator]  # the user's attention kernels again
        describes = _config_describes(pruned)
    after_flops = sum(block_flops(pruned, {**kwargs, **extra}))
    return HFResult(pruned, result, adapter, names, example_t, blocks_total, after_flops, after, describes)


def from_pretrained(path: str | Path, cls: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by ``res.model.save_pretrained(path)`` (any ``fxprune.hf`` result).

    The class is ``cls`` or the config's ``architectures[0]``; it is built with the original widths
    (``config.fxprune["original"]``), every pruned parameter is given its saved shape, the attributes the
    forward reads are set from them, and transformers' own ``from_pretrained`` loads the weights (with
    ``kwargs``: ``torch_dtype=``, ...; it reports missing or mismatched weights as it always does). A save
    of a model fxprune did not prune loads with the class's own ``from_pretrained``.

    Raises:
        InputError: the config names no transformers class and ``cls`` is not given.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, str(arch), None)
        if cls is None:
            raise InputError(f"{path}: the config names no transformers class ({arch!r}); pass cls=")
    info = getattr(config, "fxprune", None)
    if not info:
        return cls.from_pretrained(path, **kwargs)  # type: ignore[no-any-return]
    model: Any = _pruned_class(cls)
    model = model.from_pretrained(path, **kwargs)  # transformers' own loader
    model.__class__ = cls
    return model.eval()  # type: ignore[no-any-return]


def _pruned_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__init__`` builds the original widths (``config.fxprune["original"]``)
    and then gives every pruned parameter its saved shape, so that ``from_pretrained`` (checkpoint key
    conversions, shards, dtypes included) loads the pruned weights into it."""

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        info = getattr(config, "fxprune", None) or {}
        pruned = {k: getattr(config, k) for k in info.get("original", {})}
        for k, v in info.get("original", {}).items():
            setattr(config, k, v)
        try:
            cls.__init__(self, config, *args, **kwargs)  # type: ignore[misc]
        finally:
            for k, v in pruned.items():  # the modules share this config object: the pruned widths again
                setattr(config, k, v)
        with torch.no_grad():
            for name, shape in info.get("shapes", {}).items():
                owner, _, leaf = name.rpartition(".")
                mod = self.get_submodule(owner)
                if leaf in mod._parameters:
                    mod._parameters[leaf] = nn.Parameter(
                        torch.empty(shape, dtype=mod._parameters[leaf].dtype)
                    )
                else:
                    mod._buffers[leaf] = torch.empty(shape, dtype=mod._buffers[leaf].dtype)
        _fix_attributes(self)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__qualname__": cls.__qualname__,
                                       "__module__": cls.__module__})  # fmt: skip
