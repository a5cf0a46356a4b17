"""Second-order data scores on the shared channel mask (shared/METHODS.md): ``grad_norm``, ``sosp_h``,
``ifso_code`` and ``influence`` (the default: the retrained loss change of IFSO, Cheng/Zhang/Shi 2024).

Notation: ``g`` = dL/dm, ``H_mm``, ``H_wm`` = the blocks of the Hessian of ``L(w, m)`` at ``m = 1``; every
product is one extra backward pass through the gradient graph (``MaskedLoss.hvp``) or a Gauss-Newton product
(``MaskedLoss.gnvp``), averaged over the calibration batches.

Every average over batches is a mergeable ``Sum`` (``fxprune.passes.stats``): the one-pass scores
(``grad_norm``, ``sosp_h``) are ``from_statistics(loss, statistics(loss, batches))``; the multi-stage ones
(``ifso_code``, ``influence``: products of products, CG iterations) combine each stage's sum over batches
(``MaskedLoss.combine``) before the next stage uses it, so a split or a distributed run computes the same
products (``mask_products``, ``MaskedLoss.solve_ww``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from fxprune.passes.masking import MaskedLoss, MaskScorePass, Vec
from fxprune.passes.stats import Joint, Sum

from fxprune.calib import Batch

__all__ = ["GradNormScore", "IFSOCodeScore", "InfluenceScore", "SOSPHScore", "mask_products", "probe_chunk"]


def mask_products(
    loss: MaskedLoss,
    batches: Iterable[Batch],
    vectors: Sequence[Vec],
    curvature: str,
    scale: float | None = None,
) -> list[Vec]:
    """Curvature times each vector, averaged over ``batches`` (one shared backward graph per batch): the
    combined ``MaskedLoss.curvature_sum`` with ``scale`` = 1 / (number of batches, over all processes),
    counted by a pass over ``batches`` when not given."""
    scale = 1.0 / loss.count(batches)[1] if scale is None else scale
    return loss.unpack(loss.combine(loss.curvature_sum(batches, vectors, curvature, scale)).result())


#: weight-sized vectors one probe keeps alive while the influence score runs (its curvature product, the CG
#: iterate, residual, direction and product, and the back product)
VECTORS_PER_PROBE = 6


def probe_chunk(loss: MaskedLoss, memory_gb: float, most: int = 8) -> int:
    """How many probes to run in lockstep so their weight-sized vectors fit in ``memory_gb`` (1 to ``most``)."""
    w_bytes = sum(w.numel() * w.element_size() for w in loss.w0)
    fits = int(memory_gb * 2**30 // max(1, VECTORS_PER_PROBE * w_bytes))
    return max(1, min(most, fits))


class GradNormScore(MaskScorePass):
    """Gradient-norm preservation (Lubana & Dick 2021): ``|sum over channel c's columns of w * (H g)|``,
    the first-order change of ``||g||^2`` when the channel is removed; one Hessian-vector product per batch."""

    name = "grad_norm"

    defaults = {"weight_decay": 0.0}

    def statistics(self, loss: MaskedLoss, batches: Iterable[Batch]) -> Sum:
        """``sum_b (n_b / N) site_reduce(H_b g_b)`` (each batch's own gradient); count: the samples."""
        stat = Sum.zeros_like([torch.zeros(loss.size, device=loss.device)])
        zero_m = torch.zeros(loss.size, device=loss.device)
        for b in batches:
            gw, _ = loss.grad(b)
            ((hg, _),) = loss.hvp(b, [(gw, zero_m)])
            stat.update([loss.site_reduce(hg) * (b.size / loss.samples)], count=b.size)
        return stat

    def from_statistics(self, loss: MaskedLoss, stat: Sum) -> tuple[torch.Tensor, None]:
        (acc,) = stat.result()
        return acc.abs(), None

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        return self.from_statistics(
            loss, loss.combine(self.statistics(loss, self.bar(loss.batches(), "H g")))
        )


class SOSPHScore(MaskScorePass):
    """SOSP-H (Nonnenmacher et al. 2022): ``|-g_c + 1/2 (G 1)_c|`` with ``G`` the Gauss-Newton matrix in the
    mask, ``G 1`` its product with all structures at once (one JVP + VJP per batch)."""

    name = "sosp_h"

    defaults = {"weight_decay": 0.0}

    def statistics(self, loss: MaskedLoss, batches: Iterable[Batch]) -> Joint:
        """``Joint(gradient sum, Gauss-Newton product sum with (0, 1))``: two ``Sum`` over the same batches
        (the mean gradient weighted by samples, the product by batches as the other curvature scores)."""
        ones = torch.ones(loss.size, device=loss.device)
        grad = loss.gradient_sum(batches, weights=False)
        prod = loss.curvature_sum(batches, [(loss.zeros_w(), ones)], "gn", 1.0 / loss.n_batches)
        return Joint(grad, prod)

    def from_statistics(self, loss: MaskedLoss, stat: Joint) -> tuple[torch.Tensor, None]:
        grad, prod = stat.parts
        (g,) = grad.result()
        ((_, g1),) = loss.unpack(prod.result())
        return (0.5 * g1 - g).abs(), None

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        return self.from_statistics(loss, loss.combine(self.statistics(loss, loss.batches())))


class IFSOCodeScore(MaskScorePass):
    """The IFSO reference implementation's score, for comparison: ``|H_mw H_wm 1| / damping`` — the cross
    term only, with ``H_ww^-1`` replaced by ``(1/damping) I`` and the row sum instead of the diagonal."""

    name = "ifso_code"

    defaults = {"weight_decay": 0.0, "damping": 1.0, "curvature": "hessian"}

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        ones = torch.ones(loss.size, device=loss.device)
        zero_m = torch.zeros(loss.size, device=loss.device)
        curv = str(self.options["curvature"])
        batches = loss.batches()
        ((u, _),) = mask_products(loss, batches, [(loss.zeros_w(), ones)], curv)  # each stage: a combined Sum
        ((_, a1),) = mask_products(loss, batches, [(u, zero_m)], curv)
        return a1.abs() / float(self.options["damping"]), None


class InfluenceScore(MaskScorePass):
    """The retrained loss change of removing channel ``c`` alone (influence function, IFSO):

        dF_c = -g_c + 1/2 * (H_mm - H_mw (H_ww + damping I)^-1 H_wm)_cc

    ``H_ww^-1`` by damped conjugate gradients (``cg_iters``) on the exact Hessian or the Gauss-Newton matrix
    (``curvature``); the diagonal for all channels at once by ``probes`` Rademacher (Hutchinson) probes, or
    exactly with ``diag="exact"`` (one probe per channel: for small models and tests). Probes run in
    lockstep chunks of at most 8, fewer when the weight-sized vectors that a chunk keeps would exceed
    ``memory_gb`` (``probe_chunk``; at least one). ``spread`` is the
    standard error of the Hutchinson estimate. ``hessian_batches`` limits the batches used for curvature
    (the gradient ``g`` always uses all of them; ``None`` = all).

    Caveat, measured and proven: the mask scales its consumer columns ``v_c``, which are among the weights
    ``w`` being "retrained", so ``H_wm e_c = H_ww v_c + P_c g_w`` and the Schur diagonal collapses to
    ``-2 g_c - (P_c g_w)^T H_ww^-1 (P_c g_w)``: retraining ``v_c`` undoes the mask to first order, and what is
    left is gradient, weight-decay and damping terms, small next to the off-diagonal entries that the
    Hutchinson probes add as noise (``tests/passes/test_scores.py::
    test_mask_schur_complement_reduces_to_gradient_terms``). On the digits nets this score ranks worst
    (``bench/quality.py``), so ``compile``'s default is ``fisher``; this one stays for comparison.
    """

    name = "influence"

    cost_exponent = 0.5
    defaults = {
        "weight_decay": 0.0,
        "damping": 1e-3,
        "probes": 8,
        "cg_iters": 8,
        "curvature": "hessian",
        "diag": "hutchinson",
        "hessian_batches": 1,
        "retrained": True,
        "memory_gb": 2.0,
    }

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        opts = self.options
        _, g = self.mean_grad(loss)
        batches = self.hessian_batches(loss)
        scale = 1.0 / loss.count(batches)[1]
        curv = str(opts["curvature"])
        k = loss.size
        if opts["diag"] == "exact":
            probes = torch.eye(k, device=loss.device)
        elif opts["diag"] == "hutchinson":
            n = max(1, int(opts["probes"]))
            probes = (torch.randint(0, 2, (n, k), generator=gen).float() * 2 - 1).to(loss.device)
        else:
            from fxprune.errors import InputError

            raise InputError(f"diag={opts['diag']!r}: choose 'hutchinson' or 'exact'")
        zero_m = torch.zeros(k, device=loss.device)
        samples_mm, samples_a = [], []
        chunk = probe_chunk(loss, float(opts["memory_gb"]))
        for start in self.bar(range(0, len(probes), chunk), "probes"):
            zs = probes[start : start + chunk]
            prods = mask_products(loss, batches, [(loss.zeros_w(), z) for z in zs], curv, scale)
            samples_mm += [z * hm for z, (_, hm) in zip(zs, prods, strict=True)]
            if opts["retrained"]:
                sols = loss.solve_ww([hw for hw, _ in prods], batches, curv, float(opts["damping"]),
                                     int(opts["cg_iters"]))  # fmt: skip
                backs = mask_products(loss, batches, [(s, zero_m) for s in sols], curv, scale)
                samples_a += [z * am for z, (_, am) in zip(zs, backs, strict=True)]
        mm = torch.stack(samples_mm)
        a = torch.stack(samples_a) if samples_a else torch.zeros_like(mm)
        per_probe = 0.5 * (mm - a)
        if opts["diag"] == "exact":
            diag = per_probe.sum(0)
            spread = torch.zeros_like(diag)
        else:
            diag = per_probe.mean(0)
            spread = (
                per_probe.std(0) / len(per_probe) ** 0.5 if len(per_probe) > 1 else torch.zeros_like(diag)
            )
        return -g + diag, spread
