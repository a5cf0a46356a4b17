"""Group OBS with Kronecker-factored curvature: the loss change of removing a channel *after* the least-squares
compensation that ``compile(..., compensate="lsq")`` applies (shared/METHODS.md, "Group OBS"; issue 15).

The model of the loss, per consumer ``k`` (an ``nn.Linear`` or ``nn.Conv2d`` that reads the channel, as
``compensate.find_consumers`` finds them): K-FAC (Martens & Grosse 2015; for convolutions KFC, Grosse &
Martens 2016: positions independent) factors the Gauss-Newton matrix of the loss in the consumer's extended
weight ``[W b]`` (``b``: the output shift the refit may add) as ``A_k (x) G_k``, so a change ``dW`` costs

    dL = 1/2 tr(G_k dW A_k dW^T)

- ``A_k = E_rows [x 1][x 1]^T``: the mean over rows (every position of every sample where the weight meets
  its input: one row of the unfolded input of a conv, one token of a linear; at most ``max_rows`` per call,
  a fixed subset) of the extended input's outer product. It is the Gram that lsq compensation collects
  (``compensate.consumer_statistics(..., lsq=True)``), normalised by its own row count (its corner entry).
  Without a shift target (no bias, no BatchNorm after it: ``compensate.shift_target``) the constant is left
  out, as lsq leaves it out.
- ``G_k = sum_b (N_b / N) sum_{n in b} sum_p sum_j d_npj d_npj^T``, ``d_npj = J_np^T f_nj``: the Gauss-Newton
  factor of the loss ``L = sum_b (N_b / N) L_b`` (the sample-weighted mean of the batch losses, as every
  score here). ``f_nj`` are the columns of a factor of sample ``n``'s block of the batch loss's output Hessian,
  ``H_n = sum_j f_nj f_nj^T`` (its eigenvectors scaled by the root of their eigenvalues, at most ``rank`` of
  them, largest first), and ``J_np^T f`` is ``f`` back-propagated to the consumer's output at position ``p``.
  For cross-entropy this is the exact Fisher, for the label-free output-matching loss ``J^T J / N``; for a
  consumer that computes the output and a quadratic loss, the curvature itself.

Removing channel ``c`` forces the consumer columns ``Q`` it feeds (its input positions ``offset + c*repeat +
j``, times the kernel taps of a conv) to zero, ``dW_Q = -W_Q``; the other columns ``S`` (and the shift) adapt.
Without damping the optimum (Optimal Brain Surgeon with that equality constraint; OBC, Frantar & Alistarh
2022, per layer) is

    dL_k(c) = 1/2 tr(G_k W_Q [(A_k^-1)_QQ]^-1 W_Q^T) = 1/2 tr(G_k W_Q (A_QQ - A_QS A_SS^-1 A_SQ) W_Q^T)

reached at ``dW_S = -W_Q [(A^-1)_QQ]^-1 (A^-1)_QS = W_Q A_QS A_SS^-1``, the same ``dW_S`` for every ``G``: the
least-squares refit of the kept columns and shift to the consumer's original output, which is what lsq
compensation sets. So the score is the predicted loss *after* the compensation that compile applies: exactly
``compensate="lsq_independent"`` (every consumer refitted on the original inputs), and ``"lsq"`` (the default,
in graph order on the pruned network's inputs) wherever no consumer of the removed channels feeds another
one; where one does, ``"lsq"`` also corrects the later one's changed input, which the score leaves out. The
constant ``1/2`` is the quadratic model's; ``dL`` is in loss units (``cost_exponent = 1``).

Damping: lsq solves the ridge ``W' = W A_:S (A_SS + delta I)^-1`` (towards zero), and the score evaluates
``1/2 tr(G dW A dW^T)`` at exactly that refit (``_ridge_obs``: closed form from ``M = (A + delta I)^-1`` and
its square, no solve per channel), with ``delta = damping * mean(diag A_k)`` and lsq's default ``damping``
(``1e-3``). The damped OBS formula, ``[((A + delta I)^-1)_QQ]^-1``, would instead be the optimum of a refit
damped towards ``W``; it adds ``delta |W_Q|^2`` to every channel and overstated the loss of channels that the
others nearly reproduce by up to 13% at ``damping=1e-3`` on a tiny net, where the ridge form is within 0.5%
(lsq's ``delta`` uses the mean diagonal of the kept block, not of all of ``A``: the rest of the gap).

Single channels (``joint=False``): the score of channel ``c`` is ``sum_k dL_k(c)`` over the consumers of its
group (K-FAC's curvature is block-diagonal across layers, and compensation refits each consumer alone on the
original inputs).

Sets (``joint=True``, the default): selection removes many channels of a group at once and lsq refits them
together, and two channels that stand in for each other are each cheap alone but not together. So within
each group the channels are removed greedily (OBC, ZipLM): at each step the one whose removal, given those
already removed, costs least (``1/2 tr(G W_Q [M_QQ]^-1 W_Q^T)``, summed over its consumers), then every
consumer's ``W`` takes that refit and ``M = (A + delta I)^-1`` its block downdate (``greedy_obs``). A
channel's score is its marginal cost in that order, kept non-decreasing along it (a running maximum), so the
selection (lowest scores first) follows the order and the scores it removes from a group sum to the OBS cost
of removing them together, ``1/2 tr(G W_S [((A + delta I)^-1)_SS]^-1 W_S^T)``. On the digits ResNet-20 at
half the FLOPs, with lsq: 0.982 accuracy against 0.651 for the single-channel scores (fisher: 0.940).

What this leaves out: the interaction of groups that share a consumer (a concatenation's segments), the
change of a later consumer's input when an earlier one is refitted, and K-FAC's own approximations (positions
independent: a conv whose output gradients are correlated across positions, e.g. before a global pool, is
under-weighted, by 2-14x per layer on the digits ResNet-20 against the per-sample Gauss-Newton form).

Statistics: ``Joint`` of one ``Sum`` per consumer (``consumer_statistics``: ``[sum x, [X 1]^T [X 1]]``) and
one ``Sum`` of ``N_b * G_b`` per consumer counted in samples, so splits merge and ``reduce`` makes them global.
Each batch runs the model twice (once without gradients for the Gram, once with) and back-propagates one
vector per kept eigenvector of the output Hessian (``rank``; 9 for ten-class cross-entropy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from fxprune.passes.compensate import Consumer, consumer_statistics, find_consumers, shift_target
from fxprune.passes.masking import MaskedLoss, MaskScorePass, tensor_leaves
from fxprune.passes.op_table import DEFAULT_TABLE
from fxprune.passes.plan import build_plan
from fxprune.passes.stats import Joint, Sum

from fxprune.calib import Batch
from fxprune.errors import NumericalError, ScoreNotApplicable

__all__ = [
    "ConsumerLayout",
    "Factors",
    "OBSScore",
    "consumer_layouts",
    "greedy_obs",
    "output_hessian_factors",
]

log = logging.getLogger(__name__)

#: elements of the per-sample output Hessians held at once while they are built (columns in chunks)
_HESSIAN_ELEMENTS = 2**24


@dataclass(frozen=True)
class ConsumerLayout:
    """One consumer as the score sees it: the module call, whether its refit has a shift (a constant
    column), how many weight columns one input position spans (``k*k`` for a conv, 1 for a linear), and per
    group that it reads the input positions of each channel (``channels x positions``)."""

    key: str
    consumer: Consumer
    shift: bool
    per_position: int
    reads: tuple[tuple[int, torch.Tensor], ...]


def consumer_layouts(loss: MaskedLoss) -> list[ConsumerLayout]:
    """Every consumer of the prunable groups of ``loss``, found as compensation finds them (``find_consumers``
    on a plan that touches every group), in a fixed order.

    Raises:
        ScoreNotApplicable: a group's channels are read by something lsq cannot refit (not an ``nn.Linear`` or
            ``nn.Conv2d`` module with its own weight, a grouped conv, string padding); the message names it.
    """
    groups = loss.groups
    plan = build_plan(groups, {g.id: tuple(range(g.size)) for g in groups})
    consumers, skipped = find_consumers(loss.model, plan, groups, DEFAULT_TABLE)
    unsupported = dict(skipped)
    for key, c in consumers.items():
        if not (isinstance(c.module, nn.Linear) or (isinstance(c.module, nn.Conv2d)
                                                     and not isinstance(c.module.padding, str))):  # fmt: skip
            unsupported[key] = f"{type(c.module).__name__} (lsq unfolds nn.Conv2d and nn.Linear inputs only)"
    if unsupported:
        listed = "; ".join(f"{k}: {why}" for k, why in sorted(unsupported.items()))
        raise ScoreNotApplicable(
            f"score='obs' models each consumer that lsq compensation refits, but prunable channels are also "
            f"read by: {listed}. Use score='fisher', or pin the groups they read (exclude=)"
        )
    out = []
    for key in sorted(consumers):
        c = consumers[key]
        w = c.module.weight
        assert isinstance(w, torch.Tensor)
        reads: dict[int, list[torch.Tensor]] = {}
        for g in groups:
            for s in g.sites:
                if s.role == "in" and s.param == f"{key}.weight":
                    if s.dim != 1:
                        raise ScoreNotApplicable(
                            f"score='obs': {s.param} reads group {g.id} along dim {s.dim}, not 1"
                        )
                    pos = (
                        s.offset + torch.arange(g.size)[:, None] * s.repeat + torch.arange(s.repeat)[None, :]
                    )
                    reads.setdefault(g.id, []).append(pos)
        per_position = w[0].numel() // w.shape[1]
        shift = shift_target(loss.model, c, DEFAULT_TABLE) is not None
        layout = tuple((gid, torch.cat(parts, 1)) for gid, parts in sorted(reads.items()))
        out.append(ConsumerLayout(key, c, shift, per_position, layout))
    return out


def _grads(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
           vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # fmt: skip
    """``J^T v`` for a stack of vectors (leading dim) at once (``is_grads_batched``), else one at a time."""
    k = vectors[0].shape[0]
    try:
        raw = torch.autograd.grad(outputs, inputs, vectors, retain_graph=True, allow_unused=True,
                                  is_grads_batched=True)  # fmt: skip
    except RuntimeError as exc:  # an op without a batching rule
        log.debug("batched output Hessian columns unavailable (%s); looping", exc)
        rows = [torch.autograd.grad(outputs, inputs, [v[i] for v in vectors], retain_graph=True,
                                    allow_unused=True) for i in range(k)]  # fmt: skip
        return [torch.stack([torch.zeros_like(x) if r[j] is None else r[j].detach() for r in rows])
                for j, x in enumerate(inputs)]  # fmt: skip
    return [torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device) if g is None else g.detach()
            for g, x in zip(raw, inputs, strict=True)]  # fmt: skip


def output_hessian_factors(
    outs: Sequence[torch.Tensor], loss_of: Callable[[list[torch.Tensor]], torch.Tensor], rank: int,
    max_outputs: int,
) -> list[list[torch.Tensor]]:  # fmt: skip
    """Vectors ``f_j`` shaped like ``outs`` with ``sum_j f_j f_j^T`` equal to the Hessian of ``loss_of(outs)``
    in the outputs, sample by sample (dim 0 of every output is the sample).

    Each sample's block ``H_n`` (``O x O``, ``O`` = output elements per sample) is built from ``O``
    Hessian-vector products with ``e_j`` set in every sample at once, which reads the per-sample blocks of a
    loss that is a sum or mean of per-sample terms (the K-FAC assumption; a loss coupling samples is not).
    Then ``f_nj = sqrt(lambda_nj) u_nj`` from its eigenvectors, the ``rank`` largest per sample (negative
    eigenvalues clipped to 0, the Gauss-Newton matrix is PSD); directions zero in every sample are dropped.

    Raises:
        ScoreNotApplicable: an output without the batch dim, or more than ``max_outputs`` elements per sample.
    """
    n = outs[0].shape[0] if outs[0].dim() else -1
    if any(o.dim() == 0 or o.shape[0] != n for o in outs):
        raise ScoreNotApplicable(
            f"score='obs' needs every model output batch-first (dim 0 = the samples), got shapes "
            f"{[tuple(o.shape) for o in outs]}; use score='fisher'"
        )
    with torch.enable_grad():
        return _factors(outs, loss_of, rank, max_outputs, n)


def _factors(outs: Sequence[torch.Tensor], loss_of: Callable[[list[torch.Tensor]], torch.Tensor], rank: int,
             max_outputs: int, n: int) -> list[list[torch.Tensor]]:  # fmt: skip
    leaves = [o.detach().requires_grad_(True) for o in outs]
    raw = torch.autograd.grad(loss_of(leaves), leaves, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(raw) if g is not None and g.requires_grad]
    if not used:  # the loss is linear in the outputs: no curvature
        return []
    sizes = [leaves[i][0].numel() for i in used]
    total = sum(sizes)
    if total > max_outputs:
        raise ScoreNotApplicable(
            f"score='obs' factors each sample's {total}-element output Hessian, more than "
            f"max_outputs={max_outputs}; raise max_outputs= or use score='fisher'"
        )
    dtype, device = leaves[used[0]].dtype, leaves[used[0]].device
    eye = torch.eye(total, dtype=dtype, device=device)
    chunk = max(1, _HESSIAN_ELEMENTS // max(1, n * total))
    columns = []
    for start in range(0, total, chunk):
        e = eye[start : start + chunk]
        k, vectors, at = e.shape[0], [], 0
        for i, size in zip(used, sizes, strict=True):
            part = e[:, at : at + size][:, None, :].expand(k, n, size)
            vectors.append(part.reshape(k, *leaves[i].shape).to(leaves[i].dtype))
            at += size
        hv = _grads([raw[i] for i in used], [leaves[i] for i in used], vectors)  # type: ignore[misc]
        columns.append(torch.cat([h.reshape(k, n, -1) for h in hv], 2))  # column j, sample, row
    hess = torch.cat(columns, 0).permute(1, 2, 0).double()  # sample, row, column
    values, vecs = torch.linalg.eigh(0.5 * (hess + hess.transpose(1, 2)))
    values = values.clamp(min=0)
    floor = 1e-12 * float(values.max()) if values.numel() else 0.0
    factors = []
    for j in range(total - 1, max(total - rank, 0) - 1, -1):  # largest first
        if float(values[:, j].max()) <= floor:
            continue
        f = vecs[:, :, j] * values[:, j].sqrt()[:, None]  # sample x O
        parts, at = [torch.zeros_like(o) for o in outs], 0
        for i, size in zip(used, sizes, strict=True):
            parts[i] = f[:, at : at + size].reshape(outs[i].shape).to(outs[i].dtype)
            at += size
        factors.append(parts)
    return factors


def _rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A consumer's output as rows (positions x output channels), float64."""
    if isinstance(module, nn.Linear):
        return t.reshape(-1, t.shape[-1]).double()
    return t.movedim(1, -1).reshape(-1, t.shape[1]).double()


def _ridge_obs(
    w: torch.Tensor, m: torch.Tensor, g: torch.Tensor, delta: float, cols: torch.Tensor
) -> torch.Tensor:
    """``1/2 tr(G dW A dW^T)`` for each channel (a row of ``cols``: its columns ``Q``), ``dW`` the ridge refit
    that lsq applies: ``Q`` set to zero, the rest ``S`` refit to ``W A_:S (A_SS + delta I)^-1``.

    With ``M = (A + delta I)^-1``, ``u = W M`` and ``Y = (W_Q - delta u_Q) M_QQ^-1`` the refit is, over all
    columns, ``dW = -(Y M_Q: + delta u)`` (its ``Q`` part is ``-W_Q``; ``(A_SS + delta I)^-1`` is the block
    downdate of ``M``). With ``A = M^-1 - delta I``:

        dW A dW^T = Y M_QQ Y^T + delta (Y u_Q^T + u_Q Y^T) + delta^2 W M W^T
                    - delta (Y (M^2)_QQ Y^T + delta (Y (u M)_Q^T + (u M)_Q Y^T) + delta^2 W M^2 W^T)

    At ``delta = 0`` this is group OBS, ``W_Q [(A^-1)_QQ]^-1 W_Q^T``; the ``delta`` terms are the ridge's
    shrinkage towards zero, so the score is the quadratic model's loss after the refit compensation computes,
    not after a refit damped towards ``W`` (whose ``(A_QQ + delta I)`` overstates channels that the others
    nearly reproduce)."""
    m2 = m @ m
    u, um = w @ m, w @ m2
    m_qq = m[cols[:, :, None], cols[:, None, :]]  # channel x q x q
    m2_qq = m2[cols[:, :, None], cols[:, None, :]]
    w_q, u_q, um_q = (t[:, cols].permute(1, 0, 2) for t in (w, u, um))  # channel x out x q
    y = torch.linalg.solve(m_qq, (w_q - delta * u_q).transpose(1, 2)).transpose(1, 2)  # M_QQ symmetric
    gy = g @ y
    yty = y.transpose(1, 2) @ gy  # Y^T G Y
    trace = (
        (yty * m_qq).sum((1, 2))
        + 2 * delta * (gy * u_q).sum((1, 2))
        - delta * (yty * m2_qq).sum((1, 2))
        - 2 * delta**2 * (gy * um_q).sum((1, 2))
    )
    constant = delta**2 * float((g * (u @ w.T)).sum()) - delta**3 * float((g * (um @ w.T)).sum())
    return 0.5 * (trace + constant)


@dataclass(frozen=True)
class Factors:
    """One consumer's curvature, ready to score: its extended weight ``[W 0]`` (``out x d``, ``d`` with the
    constant when lsq refits a shift), ``M = (A + delta I)^-1``, ``delta``, ``G``, and per group it reads
    the weight columns of each channel (``channels x q``)."""

    w: torch.Tensor
    m: torch.Tensor
    g: torch.Tensor
    delta: float
    cols: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def of(cls, lay: ConsumerLayout, gram_stat: Sum, g: torch.Tensor, damping: float) -> Factors:
        """From the merged Gram (``consumer_statistics``) and the merged ``G``.

        Raises:
            NumericalError: ``A + delta I`` is not positive definite (``damping=0``, a rank-deficient input).
        """
        _, gram = gram_stat.result()
        w = lay.consumer.module.weight
        assert isinstance(w, torch.Tensor)
        w_mat = w.detach().reshape(w.shape[0], -1).double().to(gram.device)
        d = w_mat.shape[1] + (1 if lay.shift else 0)
        a = gram[:d, :d] / gram[-1, -1]  # the corner counts the rows: a mean over rows
        delta = damping * float(a.diagonal().mean())
        chol, info = torch.linalg.cholesky_ex(a + delta * torch.eye(d, dtype=a.dtype, device=a.device))
        if int(info) != 0:
            raise NumericalError(
                f"score='obs': the input second moment of {lay.key} is singular (damping={damping}); "
                "raise damping="
            )
        w_ext = torch.cat([w_mat, w_mat.new_zeros(w_mat.shape[0], 1)], 1)[:, :d]  # the shift starts at 0
        taps = torch.arange(lay.per_position, device=gram.device)
        cols = tuple(
            (gid, (pos.to(gram.device)[:, :, None] * lay.per_position + taps).reshape(pos.shape[0], -1))
            for gid, pos in lay.reads
        )
        return cls(w_ext, torch.cholesky_inverse(chol), g.to(gram.device), delta, cols)


def greedy_obs(reads: Sequence[tuple[Factors, torch.Tensor]], size: int, flush: int = 32) -> torch.Tensor:
    """Marginal costs of removing one group's channels one after another in the greedy OBS order (OBC):
    at each step the channel whose removal costs least, summed over the consumers that read it,
    ``1/2 tr(G W_Q [M_QQ]^-1 W_Q^T)``; then every consumer's ``W`` takes that channel's refit
    (``W -= W_Q M_QQ^-1 M_Q:``) and ``M`` its block downdate (``M -= M_:Q M_QQ^-1 M_Q:``, the damped inverse of
    the remaining columns' ``A``). The sum of the first ``k`` marginals is the OBS cost of removing those
    ``k`` together, ``1/2 tr(G W_S [M_SS]^-1 W_S^T)``. Made non-decreasing along the order (a running
    maximum), so that selection, which removes the lowest scores first, follows it.

    The downdates are lazy (as GPTQ batches its updates): ``M`` is kept as ``M_0 - U U^T`` with ``U`` the
    factors ``M_:Q L^-T`` (``L L^T = M_QQ``) of the downdates since ``M_0`` was last brought up to date, which
    happens every ``flush`` channels in one matrix product; each step reads only the chosen channel's
    columns of ``M`` (``M_0[:, Q] - U U_Q^T``) and keeps every channel's diagonal block ``M_QQ`` current, so a
    step costs ``O(d q r)`` instead of the ``O(d^2 q)`` of a full downdate (``d``: the consumer's columns)."""
    ws, gws, ms, us, blocks = [], [], [], [], []
    for f, cols in reads:  # columns reordered so that channel c's are c*q .. c*q + q - 1 (views, no gathers)
        rest = torch.ones(f.w.shape[1], dtype=torch.bool, device=f.w.device)
        rest[cols.reshape(-1)] = False
        perm = torch.cat([cols.reshape(-1), rest.nonzero().flatten()])
        ws.append(f.w[:, perm])
        gws.append((f.g @ f.w)[:, perm])  # G W, kept up to date: the per-channel cost needs only its columns
        ms.append(f.m[perm][:, perm])  # M_0
        us.append(f.m.new_zeros(f.m.shape[0], 0))  # U: M = M_0 - U U^T
        q = cols.shape[1]
        blocks.append(ms[-1][: size * q, : size * q].reshape(size, q, size, q).diagonal(dim1=0, dim2=2)
                      .permute(2, 0, 1).clone())  # channel x q x q, current  # fmt: skip
    eyes = [
        torch.eye(cols.shape[1], dtype=m.dtype, device=m.device)
        for (_, cols), m in zip(reads, ms, strict=True)
    ]
    alive = torch.ones(size, dtype=torch.bool, device=ws[0].device)
    out = torch.zeros(size, dtype=torch.float64, device=ws[0].device)
    floor = 0.0
    for _ in range(size):
        cost = torch.zeros(size, dtype=torch.float64, device=alive.device)
        for (_, cols), w, gw, block in zip(reads, ws, gws, blocks, strict=True):
            q = cols.shape[1]
            w_q = w[:, : size * q].unflatten(1, (size, q)).permute(1, 2, 0)  # channel x q x out
            gw_q = gw[:, : size * q].unflatten(1, (size, q)).permute(1, 0, 2)  # channel x out x q
            inner = w_q @ gw_q  # W_Q^T G W_Q
            cost += 0.5 * torch.linalg.solve(block, inner).diagonal(dim1=1, dim2=2).sum(1)
        cost[~alive] = float("inf")
        c = int(cost.argmin())
        alive[c] = False
        floor = max(floor, float(cost[c]))
        out[c] = floor
        for i, (_, cols) in enumerate(reads):
            q = cols.shape[1]
            sl = slice(c * q, (c + 1) * q)
            m_q = ms[i][:, sl] - us[i] @ us[i][sl].T  # the current M_:Q
            chol = torch.linalg.cholesky(m_q[sl])
            solve = torch.cholesky_solve(m_q.T, chol)  # M_QQ^-1 M_Q:
            ws[i].addmm_(ws[i][:, sl].clone(), solve, alpha=-1)  # in place: W is large and changes every step
            gws[i].addmm_(gws[i][:, sl].clone(), solve, alpha=-1)
            u = torch.linalg.solve_triangular(chol, m_q.T, upper=False).T  # M_:Q L^-T
            u_cols = u[: size * q].unflatten(0, (size, q))  # channel x q x q
            blocks[i] = blocks[i] - u_cols @ u_cols.transpose(1, 2)
            blocks[i][c] = eyes[i]  # removed (its block is now 0): any invertible block, it is never chosen
            us[i] = torch.cat([us[i], u], 1)
            if us[i].shape[1] >= flush * q:
                ms[i].addmm_(us[i], us[i].T, alpha=-1)
                us[i] = us[i][:, :0]
    return out


class OBSScore(MaskScorePass):
    """Group OBS with K-FAC curvature per consumer: the predicted loss change of removing channels after lsq
    compensation (the module docstring has the formulas, the factors and what it leaves out). With
    ``joint=False`` each channel alone, ``sum over consumers k of 1/2 tr(G_k dW A_k dW^T)`` at lsq's refit;
    with ``joint=True`` (default) each channel's marginal cost in the greedy removal order of its group, so
    the scores of the channels selection removes sum to the cost of removing them together.

    Options: ``damping`` (``delta = damping * mean diag A``; lsq compensation's default), ``max_rows`` (rows
    of each call in the Gram, as compensation), ``rank`` (eigenvectors of each sample's output Hessian that
    are back-propagated: 9 of ten-class cross-entropy's 10 are nonzero), ``max_outputs`` (the largest output
    per sample whose Hessian is factored), ``joint``.
    """

    name = "obs"

    cost_exponent = 1.0
    defaults = {"damping": 1e-3, "max_rows": 65536, "rank": 16, "max_outputs": 4096, "joint": True}

    def statistics(self, loss: MaskedLoss, batches: Iterable[Batch]) -> Joint:
        """``Joint(*one Sum per consumer (consumer_statistics), Sum of [N_b G_b per consumer])``; the last
        is counted in samples, so its mean is ``G``."""
        layouts = consumer_layouts(loss)
        consumers = {lay.key: lay.consumer for lay in layouts}
        grams = {lay.key: Sum() for lay in layouts}
        curvature = Sum()
        for b in batches:
            part = consumer_statistics(loss.model, consumers, [b], True, int(self.options["max_rows"]))
            grams = {key: grams[key].merge(part[key]) for key in grams}
            g_b = self._output_curvature(loss, layouts, b)
            curvature.update([g * b.size for g in g_b], count=b.size)
        return Joint(*(grams[lay.key] for lay in layouts), curvature)

    def _output_curvature(self, loss: MaskedLoss, layouts: list[ConsumerLayout], batch: Batch) -> list[
        torch.Tensor
    ]:  # fmt: skip
        """``G_b`` of every consumer on one batch: each output-Hessian factor back-propagated to the
        consumers' outputs (a zero stand-in added to each output, so the gradient is read there even where
        no weight requires one), outer products summed over samples and positions."""
        b = batch.to(loss.device)
        calls: dict[str, list[torch.Tensor]] = {lay.key: [] for lay in layouts}

        def hook(key: str) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
            def fn(_mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
                stand_in = torch.zeros_like(out, requires_grad=True)
                calls[key].append(stand_in)
                return out + stand_in

            return fn

        handles = [lay.consumer.module.register_forward_hook(hook(lay.key)) for lay in layouts]
        try:
            with torch.enable_grad():
                out = loss.model(*b.inputs)
        finally:
            for h in handles:
                h.remove()
        outs, rebuild = tensor_leaves(out, "score='obs'", "use score='fisher'")
        factors = output_hessian_factors(outs, lambda ts: loss.calib.loss(rebuild(ts), b),
                                         int(self.options["rank"]), int(self.options["max_outputs"]))  # fmt: skip
        result = []
        for lay in layouts:
            width = int(lay.consumer.module.weight.shape[0])  # type: ignore[index, union-attr]
            result.append(torch.zeros(width, width, dtype=torch.float64, device=loss.device))
        stand_ins = [(i, t) for i, lay in enumerate(layouts) for t in calls[lay.key]]
        if not stand_ins:
            return result
        for f in factors:
            grads = torch.autograd.grad(outs, [t for _, t in stand_ins], f, retain_graph=True,
                                        allow_unused=True)  # fmt: skip
            for (i, _), g in zip(stand_ins, grads, strict=True):
                if g is not None:
                    rows = _rows(layouts[i].consumer.module, g)
                    result[i] += rows.T @ rows
        return result

    def from_statistics(self, loss: MaskedLoss, stat: Joint) -> tuple[torch.Tensor, None]:
        """The score of every channel (flat, ``loss.slices``) from the merged statistics.

        Raises:
            NumericalError: ``A + delta I`` of a consumer is not positive definite (``damping=0`` and a
                rank-deficient input); raise ``damping``.
        """
        layouts = consumer_layouts(loss)
        *grams, curvature = stat.parts
        score = torch.zeros(loss.size, dtype=torch.float64, device=loss.device)
        if curvature.empty or curvature.count == 0:
            return score, None
        damping = float(self.options["damping"])
        factors = []
        for lay, gram_stat, g in zip(layouts, grams, curvature.mean(), strict=True):
            if gram_stat.empty or gram_stat.count == 0:  # never called: removing its inputs changes nothing
                continue
            factors.append(Factors.of(lay, gram_stat, g, damping))
        if self.options["joint"]:
            for gid, sl in loss.slices.items():
                reads = [(f, cols) for f in factors for rid, cols in f.cols if rid == gid]
                if reads:
                    score[sl] = greedy_obs(reads, sl.stop - sl.start).to(score.device)
            return score, None
        for f in factors:
            for gid, cols in f.cols:
                sl = loss.slices[gid]
                score[sl] += _ridge_obs(f.w, f.m, f.g, f.delta, cols).to(score.device)
        return score, None

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        stat = self.statistics(loss, self.bar(loss.batches(), "curvature"))
        return self.from_statistics(loss, loss.combine(stat))
