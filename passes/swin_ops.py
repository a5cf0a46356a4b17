"""torchvision's shifted window attention in three calls whose widths follow their weights.

torchvision traces ``shifted_window_attention`` as one opaque call (it is ``torch.fx.wrap``-ped). That call
cannot be pruned as it is: it reads the head width as ``C // num_heads`` and the attention output width
as ``C``, both from the *input* width ``C``, so the residual stream, the qkv rows and the proj columns
would all have to keep the same count, and the whole node would cost one product of widths.

``expand_shifted_window_attention`` (in ``fxprune.passes.ops_swin.EXPANSIONS``) replaces the call after
tracing by three calls computing the same values with the same ops in the same order (so the outputs are
bit-identical), with every width read from the weights:

1. ``swin_window_qkv``: pad to whole windows, cyclic shift (``torch.roll`` over H, W), partition into
   windows, qkv projection: ``[B*nW, N, 3*heads*d]``. Costs ``C_in x 3*heads*d``.
2. ``swin_window_attention``: per head ``softmax(q k^T * scale + bias + mask) v``:
   ``[B*nW, N, heads*d]``. The scale is ``d ** -0.5`` with ``d = qkv.shape[-1] // 3 // num_heads`` (equal
   to torchvision's ``(C // num_heads) ** -0.5`` at full width). Costs ``heads``.
3. ``swin_window_merge``: proj, reverse the windows, reverse the shift, unpad: ``[B, H, W, C_out]`` with
   ``C_out = proj_weight.shape[0]``. Costs ``heads*d x C_out``.

Each is ``torch.fx.wrap``-ped, so a pruned GraphModule traces again as the same three calls.

Video Swin (``torchvision.models.video.swin3d_*``): ``expand_shifted_window_attention_3d`` splits
``shifted_window_attention_3d`` the same way into ``swin3d_window_qkv``, ``swin3d_window_attention`` and
``swin3d_window_merge`` (windows over ``T, H, W`` of ``[B, T, H, W, C]``; the same argument positions as
the 2-D calls, so ``ops_swin`` rules both with the same rules). ``expand_window_and_shift_size_3d``
replaces torchvision's ``_get_window_and_shift_size``, which assigns into its list arguments: run node by
node (``fx.Interpreter``: fxprune's shape propagation) they are the graph's immutable lists, so tracing
fails wherever a window covers the whole input along a dim (every ``swin3d_t`` at 16 frames or fewer);
``swin3d_window_and_shift_size`` computes the same lists on copies.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "expand_shifted_window_attention",
    "expand_shifted_window_attention_3d",
    "expand_window_and_shift_size_3d",
    "swin3d_window_and_shift_size",
    "swin3d_window_attention",
    "swin3d_window_merge",
    "swin3d_window_qkv",
    "swin_window_attention",
    "swin_window_merge",
    "swin_window_qkv",
]


def _padding(input: Tensor, window_size: list[int]) -> tuple[int, int]:
    H, W = input.shape[1], input.shape[2]
    return (window_size[1] - W % window_size[1]) % window_size[1], (
        window_size[0] - H % window_size[0]
    ) % window_size[0]


def _shift(window_size: list[int], shift_size: list[int], pad_H: int, pad_W: int) -> list[int]:
    """torchvision's rule: no shift along a dim that one window covers."""
    shift = list(shift_size)
    if window_size[0] >= pad_H:
        shift[0] = 0
    if window_size[1] >= pad_W:
        shift[1] = 0
    return shift


def swin_window_qkv(
    input: Tensor,
    qkv_weight: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    qkv_bias: Tensor | None = None,
    zero_k_bias: bool = False,
) -> Tensor:
    """``[B, H, W, C]`` -> windows ``[B*nW, Wh*Ww, C]`` -> ``F.linear`` with the qkv weight.

    ``num_heads`` is not used here; it names the head structure of the output rows for the op rule.
    ``zero_k_bias`` (Swin V2) zeroes the key third of the bias, as torchvision does.
    """
    B, H, W, C = input.shape
    pad_r, pad_b = _padding(input, window_size)
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift = _shift(window_size, shift_size, pad_H, pad_W)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if zero_k_bias and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    return F.linear(x, qkv_weight, qkv_bias)


def swin_window_attention(
    qkv: Tensor,
    relative_position_bias: Tensor,
    input: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    logit_scale: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """Multi-head attention inside each window: ``[B*nW, N, 3*heads*d]`` -> ``[B*nW, N, heads*d]``.

    ``input`` (the block input) is read for its spatial size only: the shifted-window mask depends on it.
    """
    pad_r, pad_b = _padding(input, window_size)
    pad_H, pad_W = input.shape[1] + pad_b, input.shape[2] + pad_r
    shift = _shift(window_size, shift_size, pad_H, pad_W)
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    head_dim = qkv.shape[-1] // 3 // num_heads
    qkv = qkv.reshape(qkv.size(0), qkv.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention (Swin V2)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * head_dim**-0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        attn_mask = qkv.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(
            pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1]
        )
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, (-100.0)).masked_fill(attn_mask == 0, 0.0)
        n = q.size(2)
        attn = attn.view(q.size(0) // num_windows, num_windows, num_heads, n, n)
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(q.size(0), q.size(2), num_heads * head_dim)


def swin_window_merge(
    x: Tensor,
    proj_weight: Tensor,
    input: Tensor,
    window_size: list[int],
    shift_size: list[int],
    dropout: float = 0.0,
    proj_bias: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """``F.linear`` with the proj weight, then windows back to ``[B, H, W, C_out]`` (``input``'s H, W)."""
    B, H, W = input.shape[0], input.shape[1], input.shape[2]
    pad_r, pad_b = _padding(input, window_size)
    pad_H, pad_W = H + pad_b, W + pad_r
    shift = _shift(window_size, shift_size, pad_H, pad_W)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    C = x.shape[-1]
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


torch.fx.wrap("swin_window_qkv")
torch.fx.wrap("swin_window_attention")
torch.fx.wrap("swin_window_merge")


def expand_shifted_window_attention(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert the three calls before ``node`` (a ``shifted_window_attention`` call); return the last."""
    from torchvision.models.swin_transformer import shifted_window_attention

    a = inspect.signature(shifted_window_attention).bind(*node.args, **node.kwargs)
    a.apply_defaults()
    p = a.arguments
    with graph.inserting_before(node):
        qkv = graph.create_node(
            "call_function",
            swin_window_qkv,
            (p["input"], p["qkv_weight"], p["window_size"], p["num_heads"], p["shift_size"]),
            {"qkv_bias": p["qkv_bias"], "zero_k_bias": p["logit_scale"] is not None},
            name=f"{node.name}_qkv",
        )
        attn = graph.create_node(
            "call_function",
            swin_window_attention,
            (qkv, p["relative_position_bias"], p["input"], p["window_size"], p["num_heads"], p["shift_size"]),
            {
                "attention_dropout": p["attention_dropout"],
                "logit_scale": p["logit_scale"],
                "training": p["training"],
            },
            name=f"{node.name}_attention",
        )
        out = graph.create_node(
            "call_function",
            swin_window_merge,
            (attn, p["proj_weight"], p["input"], p["window_size"], p["shift_size"]),
            {"dropout": p["dropout"], "proj_bias": p["proj_bias"], "training": p["training"]},
            name=f"{node.name}_merge",
        )
    for n in (qkv, attn, out):  # as torch.fx marks a wrapped call: the code re-registers the wrap, so a
        n.meta["is_wrapped"] = True  # GraphModule traced again (unpickled, re-traced) keeps it one call
    return out


# ------------------------------------------------------------------------------------ 3-D (video Swin)
def swin3d_window_and_shift_size(
    shift_size: list[int], size_dhw: list[int], window_size: list[int]
) -> tuple[list[int], list[int]]:
    """torchvision's ``_get_window_and_shift_size`` on copies: along a dim the window covers (``size <=
    window``) the window shrinks to the size and the shift is 0."""
    window, shift = list(window_size), list(shift_size)
    for i in range(3):
        if size_dhw[i] <= window[i]:
            window[i] = size_dhw[i]
            shift[i] = 0
    return window, shift


def _padding_3d(input: Tensor, window_size: list[int]) -> list[int]:
    """Padding of ``T, H, W`` up to whole windows (torchvision's ``_compute_pad_size_3d``)."""
    size = input.shape[1:4]
    return [(window_size[i] - size[i] % window_size[i]) % window_size[i] for i in range(3)]


def swin3d_window_qkv(
    input: Tensor,
    qkv_weight: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    qkv_bias: Tensor | None = None,
) -> Tensor:
    """``[B, T, H, W, C]`` -> windows ``[B*nW, Wd*Wh*Ww, C]`` -> ``F.linear`` with the qkv weight.

    ``num_heads`` is not used here; it names the head structure of the output rows for the op rule.
    """
    b, c = input.shape[0], input.shape[4]
    pad = _padding_3d(input, window_size)
    x = F.pad(input, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    _, tp, hp, wp, _ = x.shape
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
    num_windows = (tp // window_size[0]) * (hp // window_size[1]) * (wp // window_size[2])
    x = x.view(
        b,
        tp // window_size[0],
        window_size[0],
        hp // window_size[1],
        window_size[1],
        wp // window_size[2],
        window_size[2],
        c,
    )
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(
        b * num_windows, window_size[0] * window_size[1] * window_size[2], c
    )
    return F.linear(x, qkv_weight, qkv_bias)


def _attention_mask_3d(
    x: Tensor, size_dhw: list[int], window_size: list[int], shift_size: list[int]
) -> Tensor:
    """torchvision's ``_compute_attention_mask_3d``: ``-100`` between tokens of different shifted regions."""
    attn_mask = x.new_zeros(*size_dhw)
    num_windows = (
        (size_dhw[0] // window_size[0]) * (size_dhw[1] // window_size[1]) * (size_dhw[2] // window_size[2])
    )
    slices = [
        ((0, -window_size[i]), (-window_size[i], -shift_size[i]), (-shift_size[i], None)) for i in range(3)
    ]
    count = 0
    for d in slices[0]:
        for h in slices[1]:
            for w in slices[2]:
                attn_mask[d[0] : d[1], h[0] : h[1], w[0] : w[1]] = count
                count += 1
    attn_mask = attn_mask.view(
        size_dhw[0] // window_size[0],
        window_size[0],
        size_dhw[1] // window_size[1],
        window_size[1],
        size_dhw[2] // window_size[2],
        window_size[2],
    )
    attn_mask = attn_mask.permute(0, 2, 4, 1, 3, 5).reshape(
        num_windows, window_size[0] * window_size[1] * window_size[2]
    )
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def swin3d_window_attention(
    qkv: Tensor,
    relative_position_bias: Tensor,
    input: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """Multi-head attention inside each window: ``[B*nW, N, 3*heads*d]`` -> ``[B*nW, N, heads*d]``.

    The scale is ``d ** -0.5`` with ``d = qkv.shape[-1] // 3 // num_heads`` (torchvision's
    ``(C // num_heads) ** -0.5`` at full width). ``input`` (the block input) is read for its size only.
    """
    pad = _padding_3d(input, window_size)
    padded = [input.shape[1 + i] + pad[i] for i in range(3)]
    num_windows = (
        (padded[0] // window_size[0]) * (padded[1] // window_size[1]) * (padded[2] // window_size[2])
    )
    head_dim = qkv.shape[-1] // 3 // num_heads
    n = qkv.size(1)
    qkv = qkv.reshape(qkv.size(0), n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * head_dim**-0.5
    attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = _attention_mask_3d(qkv, padded, window_size, shift_size)
        attn = attn.view(q.size(0) // num_windows, num_windows, num_heads, n, n)
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(q.size(0), n, num_heads * head_dim)


def swin3d_window_merge(
    x: Tensor,
    proj_weight: Tensor,
    input: Tensor,
    window_size: list[int],
    shift_size: list[int],
    dropout: float = 0.0,
    proj_bias: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """``F.linear`` with the proj weight, then windows back to ``[B, T, H, W, C_out]`` (``input``'s size)."""
    b, t, h, w = input.shape[0], input.shape[1], input.shape[2], input.shape[3]
    pad = _padding_3d(input, window_size)
    tp, hp, wp = t + pad[0], h + pad[1], w + pad[2]
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    c = x.shape[-1]
    x = x.view(
        b,
        tp // window_size[0],
        hp // window_size[1],
        wp // window_size[2],
        window_size[0],
        window_size[1],
        window_size[2],
        c,
    )
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1], shift_size[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


torch.fx.wrap("swin3d_window_and_shift_size")
torch.fx.wrap("swin3d_window_qkv")
torch.fx.wrap("swin3d_window_attention")
torch.fx.wrap("swin3d_window_merge")


def expand_window_and_shift_size_3d(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Replace a ``_get_window_and_shift_size`` call by ``swin3d_window_and_shift_size`` (same arguments)."""
    with graph.inserting_before(node):
        new = graph.create_node(
            "call_function",
            swin3d_window_and_shift_size,
            node.args,
            dict(node.kwargs),
            name=f"{node.name}_3d",
        )
    new.meta["is_wrapped"] = True
    return new


def expand_shifted_window_attention_3d(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert the three 3-D calls before ``node`` (a ``shifted_window_attention_3d`` call); return the last."""
    from torchvision.models.video.swin_transformer import shifted_window_attention_3d

    a = inspect.signature(shifted_window_attention_3d).bind(*node.args, **node.kwargs)
    a.apply_defaults()
    p = a.arguments
    with graph.inserting_before(node):
        qkv = graph.create_node(
            "call_function",
            swin3d_window_qkv,
            (p["input"], p["qkv_weight"], p["window_size"], p["num_heads"], p["shift_size"]),
            {"qkv_bias": p["qkv_bias"]},
            name=f"{node.name}_qkv",
        )
        attn = graph.create_node(
            "call_function",
            swin3d_window_attention,
            (qkv, p["relative_position_bias"], p["input"], p["window_size"], p["num_heads"], p["shift_size"]),
            {"attention_dropout": p["attention_dropout"], "training": p["training"]},
            name=f"{node.name}_attention",
        )
        out = graph.create_node(
            "call_function",
            swin3d_window_merge,
            (attn, p["proj_weight"], p["input"], p["window_size"], p["shift_size"]),
            {"dropout": p["dropout"], "proj_bias": p["proj_bias"], "training": p["training"]},
            name=f"{node.name}_merge",
        )
    for n in (qkv, attn, out):  # kept one call when the GraphModule is traced again (see the 2-D one)
        n.meta["is_wrapped"] = True
    return out
