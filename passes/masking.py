"""The shared channel mask: the loss as a function of the weights ``w`` and one mask value per channel.

Every prunable group gets a slice of one flat mask vector ``m`` (``K`` entries in all). A mask value
multiplies its channel's input columns in *every* consumer that reads the group (``Site.role == "in"``), so
coupled channels (a residual stream, a concat segment) share one mask. Setting ``m_c = 0`` computes exactly
what the pruned model computes (it is the masked-equivalence oracle), so derivatives in ``m`` are
derivatives of the loss of pruning.

``MaskedLoss`` evaluates ``L(w, m)`` on calibration batches with ``torch.func.functional_call`` on a private
copy of the GraphModule (moved to ``device``, eval mode: BatchNorm statistics are read, never updated), and
provides the products every score needs: gradients, Hessian-vector products in ``(w, m)``, Gauss-Newton
products, and a damped conjugate-gradient solve with ``H_ww``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from itertools import islice
from typing import Any, TypeVar

import numpy as np
import torch
import torch.fx as fx
from fxprune.passes.score import GroupScore, ScorePass
from fxprune.passes.stats import Reduce, Stat, Sum
from torch.func import functional_call

from fxprune.calib import Batch, Calibration, batch_sizes
from fxprune.data import ChannelGroup
from fxprune.errors import InputError, NumericalError
from fxprune.trace import copy_graph_module

__all__ = [
    "LINE_INTERVAL_S",
    "FirstBatches",
    "MaskScorePass",
    "MaskedLoss",
    "StepLines",
    "Vec",
    "default_device",
    "interactive",
    "progress",
    "split_batch",
    "tensor_leaves",
]

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Stat)

#: A vector in ``(w, m)`` space: one tensor per trainable parameter, and the flat mask part.
Vec = tuple[list[torch.Tensor], torch.Tensor]


def default_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given, else CUDA when available (under ``torchrun``, the GPU of the local rank:
    ``LOCAL_RANK`` modulo the GPU count), else CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) % torch.cuda.device_count()) if local else torch.device("cuda")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(
            f"device={device!r} is not a device torch knows ({exc}); pass e.g. device='cpu' or 'cuda:0'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={str(device)!r} but this machine has no CUDA device; use device='cpu'")
    return dev


#: Seconds between two progress lines when stderr is not a terminal (the first and last step always print).
LINE_INTERVAL_S = 5.0


def interactive() -> bool:
    """A person is watching stderr: a terminal, or a Jupyter kernel (where tqdm draws a widget)."""
    if sys.stderr is None:
        return False
    if sys.stderr.isatty():
        return True
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


class StepLines:
    """Plain progress lines on stderr, for logs: ``fxprune: {desc} {k}/{total} ({elapsed:.1f} s)``.

    A line is written after the first step, the last step, and any step that ends at least
    ``LINE_INTERVAL_S`` after the previous line, so a slow loop prints every step and a loop of thousands of
    fast steps a few lines.
    """

    def __init__(self, desc: str, total: int | None) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.t0 = self.last = time.perf_counter()

    def step(self, note: str = "") -> None:
        """One step ended; ``note`` (e.g. ``"loss 0.41"``) goes after the count."""
        self.done += 1
        now = time.perf_counter()
        first, last = self.done == 1, self.done == self.total
        if first or last or now - self.last >= LINE_INTERVAL_S:
            self.last = now
            count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
            note = f", {note}" if note else ""
            print(f"fxprune: {self.desc} {count}{note} ({now - self.t0:.1f} s)", file=sys.stderr, flush=True)


def progress(iterable: Iterable[Any], enabled: bool, desc: str) -> Iterator[Any]:
    """``iterable``, reporting progress on stderr when ``enabled``.

    Cases: (1) ``enabled`` is false: nothing is printed. (2) A person watches stderr (``interactive()``): a
    tqdm bar, erased when done. (3) Otherwise (a log file, a pipe, CI): ``StepLines``, one line per step,
    throttled to one every ``LINE_INTERVAL_S`` seconds.
    """
    if not enabled:
        yield from iterable
    elif interactive():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, leave=False)
    else:
        lines = StepLines(desc, len(iterable) if isinstance(iterable, Sized) else None)
        for item in iterable:
            yield item
            lines.step()


class MaskedLoss:
    """``L(w, m)`` over calibration batches; ``w`` are the model's floating-point parameters.

    Args:
        gm: the traced model (not modified: a copy is moved to ``device``).
        groups: channel groups; the prunable ones get mask entries (``slices[group id]``).
        calib: batches and loss.
        weight_decay: adds ``weight_decay/2 * ||w||^2`` to the loss (the training objective's L2 term).
        reduce: ``None`` for one process; in a distributed run the summing all-reduce (``dist.all_reduce``)
            that ``combine`` applies to every statistic, so each process scores its own ``calib`` and all
            agree on the estimate over the union of their batches. The normalisers ``samples`` and
            ``n_batches`` are then global too.

    Every accumulation over batches is a mergeable statistic (``fxprune.passes.stats``): a method computes it
    over an iterable of batches, ``combine`` makes it global, and the estimate is a function of it. Batches
    are only iterated (never indexed); a method that needs several passes (CG) iterates them again.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        groups: Sequence[ChannelGroup],
        calib: Calibration,
        device: torch.device,
        weight_decay: float = 0.0,
        reduce: Reduce | None = None,
    ) -> None:
        self.device = device
        self.reduce = reduce
        # vmap'd double backward (is_grads_batched) is for accelerators: on CPU a loop over the vectors was
        # 2.2x faster (8 products on the digits ResNet-20, 12.8 s vs 29.0 s)
        self._batched = device.type != "cpu"
        self.model = copy_graph_module(gm).to(device).eval()
        self.calib = calib
        self.weight_decay = weight_decay
        self.groups = [g for g in groups if g.prunable]
        self.slices: dict[int, slice] = {}
        k = 0
        for g in self.groups:
            self.slices[g.id] = slice(k, k + g.size)
            k += g.size
        self.size = k
        named = dict(self.model.named_parameters())
        self.names = [n for n, p in named.items() if p.dtype.is_floating_point]
        self.w0 = [named[n].detach() for n in self.names]
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        # (param, dim) -> index of every position into [m, 1]: the mask entry scaling it, or the constant 1.
        index: dict[tuple[str, int], torch.Tensor] = {}
        for g in self.groups:
            sl = self.slices[g.id]
            for s in g.sites:
                if s.role != "in":
                    continue
                if s.param not in named:
                    raise InputError(
                        f"consumer parameter {s.param!r} of group {g.id} is not a parameter of the model "
                        "(tied or non-parameter weight); score with score='magnitude'"
                    )
                key = (s.param, s.dim)
                if key not in index:
                    index[key] = torch.full((named[s.param].shape[s.dim],), k, dtype=torch.long)
                pos = torch.arange(sl.start, sl.stop).repeat_interleave(s.repeat)
                index[key][s.offset : s.offset + len(pos)] = pos
        self.index = {key: v.to(device) for key, v in index.items()}
        self.samples, self.n_batches = self.count(self.batches())

    # --- evaluation -----------------------------------------------------------------------------------------

    def batches(self) -> Iterable[Batch]:
        """The calibration batches of this process, to iterate (each call is a new pass over them)."""
        return self.calib.batches

    def count(self, batches: Iterable[Batch]) -> tuple[int, int]:
        """``(samples, batches)`` in ``batches``, over all processes when ``reduce`` is set."""
        samples = n = 0
        for size in batch_sizes(batches):  # a stream's sizes are read without copying its batches
            samples += size
            n += 1
        if self.reduce is None:
            return samples, n
        both = Sum([torch.tensor([float(samples), float(n)], dtype=torch.float64)]).reduce(self.reduce)
        return int(both.result()[0][0]), int(both.result()[0][1])

    def combine(self, stat: S) -> S:
        """``stat`` over all processes (``stat.reduce(self.reduce)``); itself in a single process."""
        return stat if self.reduce is None else stat.reduce(self.reduce)

    def effective(self, w: Sequence[torch.Tensor], m: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters with every consumer column scaled by its channel's mask."""
        params = dict(zip(self.names, w, strict=True))
        ext = torch.cat([m, m.new_ones(1)])
        for (name, dim), idx in self.index.items():
            t = params[name]
            shape = [1] * t.dim()
            shape[dim] = -1
            params[name] = t * ext[idx].view(shape).to(t.dtype)
        return params

    def forward(self, w: Sequence[torch.Tensor], m: torch.Tensor, batch: Batch) -> Any:
        return functional_call(self.model, {**self.effective(w, m), **self.buffers}, batch.inputs)

    def objective(self, out: Any, w: Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
        loss = self.calib.loss(out, batch)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * sum((p.float() ** 2).sum() for p in w)
        return loss

    def leaves(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        w = [p.detach().clone().requires_grad_(True) for p in self.w0]
        m = torch.ones(self.size, device=self.device, requires_grad=True)
        return w, m

    def loss_value(self, batch: Batch, m: torch.Tensor | None = None) -> float:
        with torch.no_grad():
            mm = torch.ones(self.size, device=self.device) if m is None else m
            return float(self.objective(self.forward(self.w0, mm, batch.to(self.device)), self.w0, batch))

    # --- first and second order ---------------------------------------------------------------------------

    def gradient_sum(self, batches: Iterable[Batch], weights: bool = True) -> Sum:
        """``sum_b (n_b / N) * dL_b/d(w, m)`` over ``batches``, ``N = self.samples``: the sample-weighted mean
        gradient once merged over all batches. Tensors: ``[*dL/dw, dL/dm]``, or ``[dL/dm]`` when ``weights`` is
        false; count: the samples."""
        stat = Sum.zeros_like([*(self.w0 if weights else []), torch.zeros(self.size, device=self.device)])
        for b in batches:
            gw, gm = self.grad(b)
            stat.update([*gw, gm] if weights else [gm], count=b.size, scale=b.size / self.samples)
        return stat

    def curvature_sum(
        self,
        batches: Iterable[Batch],
        vectors: Sequence[Vec],
        curvature: str,
        scale: float,
        start: Sequence[torch.Tensor] | None = None,
    ) -> Sum:
        """``start + sum_b scale * C_b v`` for each vector ``v`` over ``batches``, ``C_b`` the curvature of
        batch ``b`` (``curvature``: ``"hessian"`` or ``"gn"``; one shared backward graph per batch); with
        ``scale = 1 / (number of batches)`` the mean product once merged. Tensors: each vector's ``w`` parts
        then its mask part, vector after vector (``unpack`` gives the ``Vec`` list back); count: the batches.
        ``start`` (zeros when ``None``) is a term added once, before the batches."""
        product = self.curvature(curvature)
        init = [x for _ in vectors for x in [*self.zeros_w(), torch.zeros(self.size, device=self.device)]]
        stat = Sum(init if start is None else start)
        for b in batches:
            stat.update([x for hw, hm in product(b, vectors) for x in [*hw, hm]], scale=scale)
        return stat

    def unpack(self, tensors: Sequence[torch.Tensor]) -> list[Vec]:
        """``curvature_sum``'s flat tensors as one ``(w parts, mask part)`` per vector."""
        step = len(self.w0) + 1
        return [
            (list(tensors[i : i + step - 1]), tensors[i + step - 1]) for i in range(0, len(tensors), step)
        ]

    def _grads(self, batch: Batch, create_graph: bool) -> tuple[list[torch.Tensor], torch.Tensor, Vec]:
        w, m = self.leaves()
        b = batch.to(self.device)
        loss = self.objective(self.forward(w, m, b), w, b)
        raw = torch.autograd.grad(loss, [*w, m], create_graph=create_graph, allow_unused=True)
        g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(raw, [*w, m], strict=True)]
        return w, m, (g[:-1], g[-1])

    def grad(self, batch: Batch) -> Vec:
        """``(dL/dw, dL/dm)`` on one batch at ``m = 1``."""
        _, _, (gw, gm) = self._grads(batch, create_graph=False)
        return [x.detach() for x in gw], gm.detach()

    def hvp(self, batch: Batch, vectors: Sequence[Vec]) -> list[Vec]:
        """Hessian of ``L`` in ``(w, m)`` times each vector (one forward/backward shared by all)."""
        w, m, (gw, gm) = self._grads(batch, create_graph=True)
        if len(vectors) > 1 and self._batched:
            try:
                return self._hvp_batched(w, m, gw, gm, vectors)
            except RuntimeError as exc:  # an op without a batching rule: fall back to one product at a time
                log.debug("batched Hessian-vector products unavailable (%s); looping", exc)
                self._batched = False
                w, m, (gw, gm) = self._grads(batch, create_graph=True)
        out: list[Vec] = []
        for i, (vw, vm) in enumerate(vectors):
            dot = (gm * vm).sum() + sum((g * v).sum() for g, v in zip(gw, vw, strict=True))
            if not dot.requires_grad:  # the loss is linear in everything the vector touches
                out.append(([torch.zeros_like(x) for x in w], torch.zeros_like(m)))
                continue
            raw = torch.autograd.grad(dot, [*w, m], retain_graph=i + 1 < len(vectors), allow_unused=True)
            h = [
                torch.zeros_like(x) if hi is None else hi.detach() for hi, x in zip(raw, [*w, m], strict=True)
            ]
            out.append((h[:-1], h[-1]))
        return out

    def _hvp_batched(self, w: list[torch.Tensor], m: torch.Tensor, gw: list[torch.Tensor], gm: torch.Tensor,
                     vectors: Sequence[Vec]) -> list[Vec]:  # fmt: skip
        outs = [g for g in [*gw, gm] if g.requires_grad]
        keep = [i for i, g in enumerate([*gw, gm]) if g.requires_grad]
        grads_out = [torch.stack([([*vw, vm])[i] for vw, vm in vectors]) for i in keep]
        raw = torch.autograd.grad(outs, [*w, m], grads_out, allow_unused=True, is_grads_batched=True)
        n = len(vectors)
        h = [torch.zeros((n, *x.shape), dtype=x.dtype, device=x.device) if hi is None else hi.detach()
             for hi, x in zip(raw, [*w, m], strict=True)]  # fmt: skip
        return [([x[i] for x in h[:-1]], h[-1][i]) for i in range(n)]

    def gnvp(self, batch: Batch, vectors: Sequence[Vec]) -> list[Vec]:
        """Gauss-Newton matrix ``J^T H_out J`` (plus ``weight_decay * I`` on ``w``) times each vector."""
        w, m = self.leaves()
        b = batch.to(self.device)
        out = self.forward(w, m, b)
        outs, rebuild = tensor_leaves(out)
        leaf_out = [o.detach().requires_grad_(True) for o in outs]
        loss = self.calib.loss(rebuild(leaf_out), b)
        g_out = torch.autograd.grad(loss, leaf_out, create_graph=True)
        dummies = [torch.zeros_like(o, requires_grad=True) for o in outs]
        jt = torch.autograd.grad(outs, [*w, m], dummies, create_graph=True, allow_unused=True)
        result: list[Vec] = []
        for vw, vm in vectors:
            dot = torch.stack(
                [(j * v).sum() for j, v in zip(jt, [*vw, vm], strict=True) if j is not None]
            ).sum()
            raw_jv = torch.autograd.grad(dot, dummies, retain_graph=True, allow_unused=True)
            jv = [torch.zeros_like(o) if x is None else x for x, o in zip(raw_jv, outs, strict=True)]
            raw_hjv = torch.autograd.grad(g_out, leaf_out, jv, retain_graph=True, allow_unused=True)
            hjv = [torch.zeros_like(o) if x is None else x for x, o in zip(raw_hjv, outs, strict=True)]
            raw_gv = torch.autograd.grad(outs, [*w, m], hjv, retain_graph=True, allow_unused=True)
            gv = [
                torch.zeros_like(x) if g is None else g.detach() for g, x in zip(raw_gv, [*w, m], strict=True)
            ]
            gw = gv[:-1]
            if self.weight_decay:
                gw = [g + self.weight_decay * v for g, v in zip(gw, vw, strict=True)]
            result.append((list(gw), gv[-1]))
        return result

    def curvature(self, kind: str) -> Callable[[Batch, Sequence[Vec]], list[Vec]]:
        if kind == "hessian":
            return self.hvp
        if kind == "gn":
            return self.gnvp
        raise InputError(f"curvature={kind!r}: choose 'hessian' or 'gn'")

    # --- helpers in (w, m) space ---------------------------------------------------------------------------

    def zeros_w(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) for p in self.w0]

    def site_reduce(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum over consumer columns of channel c`` of ``w * t`` for every channel: ``d<w*m, t>/dm``."""
        out = torch.zeros(self.size + 1, device=self.device)
        by_name = dict(zip(self.names, zip(self.w0, tensors, strict=True), strict=True))
        for (name, dim), idx in self.index.items():
            p, t = by_name[name]
            prod = (p * t).float().movedim(dim, 0).reshape(p.shape[dim], -1).sum(1)
            out.index_add_(0, idx, prod)
        return out[:-1]

    def solve_ww(
        self,
        rhs: Sequence[list[torch.Tensor]],
        batches: Iterable[Batch],
        curvature: str,
        damping: float,
        iters: int,
        tol: float = 1e-4,
    ) -> list[list[torch.Tensor]]:
        """``(H_ww + damping I)^-1 b`` for each right-hand side by conjugate gradients, all in lockstep.

        ``H_ww`` is averaged over ``batches`` (iterated once per CG iteration, so a re-iterable source); each
        iteration's product ``damping v + mean_b H_b v`` is a ``curvature_sum`` over the batches, combined
        over processes. In one process the damping term starts the sum (the order of the float additions the
        solver always had); with ``reduce`` it is added after the reduction, once.
        """
        zero_m = torch.zeros(self.size, device=self.device)
        scale = 1.0 / self.count(batches)[1]

        def apply(vs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
            damped = [damping * x for v in vs for x in [*v, zero_m]]
            vectors = [(v, zero_m) for v in vs]
            if self.reduce is None:
                prods = self.curvature_sum(batches, vectors, curvature, scale, start=damped).result()
            else:
                total = self.combine(self.curvature_sum(batches, vectors, curvature, scale)).result()
                prods = [d + t for d, t in zip(damped, total, strict=True)]
            return [hw for hw, _ in self.unpack(prods)]

        def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
            return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))

        xs = [[torch.zeros_like(t) for t in b] for b in rhs]
        rs = [[t.clone() for t in b] for b in rhs]
        ps = [[t.clone() for t in b] for b in rhs]
        rr = [dot(r, r) for r in rs]
        norms = [max(v, 1e-30) for v in rr]
        active = list(range(len(rhs)))
        for _ in range(iters):
            active = [i for i in active if rr[i] > tol**2 * norms[i]]
            if not active:
                break
            aps = apply([ps[i] for i in active])
            for i, ap in zip(active, aps, strict=True):
                pap = dot(ps[i], ap)
                if pap <= 0:  # negative curvature: stop this system where it is (damping too small)
                    rr[i] = 0.0
                    continue
                alpha = rr[i] / pap
                for x, p in zip(xs[i], ps[i], strict=True):
                    x.add_(p, alpha=alpha)
                for r, a in zip(rs[i], ap, strict=True):
                    r.sub_(a, alpha=alpha)
                new = dot(rs[i], rs[i])
                beta = new / rr[i]
                rr[i] = new
                ps[i] = [r + beta * p for r, p in zip(rs[i], ps[i], strict=True)]
        return xs


def tensor_leaves(
    out: Any, what: str = "curvature='gn'", instead: str = "use curvature='hessian'"
) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors of a model output that is a tensor or a tuple/list of tensors, and the function that
    builds the same structure from other tensors (to evaluate the loss at stand-in outputs).

    Raises:
        InputError: any other output; the message says that ``what`` needs this and to ``instead``.
    """
    if isinstance(out, torch.Tensor):
        return [out], lambda ts: ts[0]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        kind = type(out)
        return list(out), lambda ts: kind(ts)
    raise InputError(
        f"{what} needs the model to return a tensor or a tuple of tensors, got {type(out).__name__}; {instead}"
    )


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """``batch`` cut into micro-batches of ``size`` samples (targets cut alike); itself if it cannot be cut."""
    n = batch.size
    if size >= n or any(t.dim() == 0 or t.shape[0] != n for t in batch.inputs):
        return [batch]

    def cut(x: Any, i: int) -> Any:
        if isinstance(x, torch.Tensor):
            return x[i : i + size] if x.dim() and x.shape[0] == n else x
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v, i) for v in x)
        return x

    return [
        Batch(tuple(t[i : i + size] for t in batch.inputs), cut(batch.targets, i)) for i in range(0, n, size)
    ]


class MaskScorePass(ScorePass):
    """Base of the data-driven scores: builds the ``MaskedLoss`` and cuts per-group results from ``K``-vectors.

    Subclasses implement ``estimate(loss) -> (mean, spread or None)`` as flat ``K``-vectors over all channels.
    """

    uses_data = True

    def score_groups(self, gm: fx.GraphModule, groups: list[ChannelGroup]) -> dict[int, GroupScore]:
        ctx = self.context
        if ctx.calibration is None:
            raise InputError(f"score={self.name!r} needs calibration data; pass data= (or use compile())")
        loss = MaskedLoss(
            gm, groups, ctx.calibration, ctx.device, float(self.options.get("weight_decay", 0.0)), ctx.reduce
        )
        if loss.size == 0:
            return {}
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            mean, spread = self.estimate(loss, gen)
        mean_np = mean.detach().double().cpu().numpy()
        spread_np = None if spread is None else spread.detach().double().cpu().numpy()
        if not np.isfinite(mean_np).all():
            raise NumericalError(
                f"score={self.name!r} produced non-finite values; raise damping= or check the data/loss"
            )
        return {
            g.id: GroupScore(
                mean_np[loss.slices[g.id]].copy(),
                None if spread_np is None else spread_np[loss.slices[g.id]].copy(),
            )
            for g in loss.groups
        }

    def estimate(
        self, loss: MaskedLoss, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bar(self, items: Iterable[Any], desc: str) -> Iterator[Any]:
        return progress(items, self.context.progress, f"{self.name}: {desc}")

    def mean_grad(self, loss: MaskedLoss) -> Vec:
        """Sample-weighted mean gradient over all batches (``MaskedLoss.gradient_sum``, combined)."""
        *gw, gm = loss.combine(loss.gradient_sum(self.bar(loss.batches(), "gradient"))).result()
        return gw, gm

    def hessian_batches(self, loss: MaskedLoss) -> Iterable[Batch]:
        """The batches the curvature is averaged over: the first ``hessian_batches`` option's worth (of this
        process's batches), or all; re-iterable."""
        n = self.options.get("hessian_batches")
        return loss.batches() if n is None else FirstBatches(loss.batches(), max(1, int(n)))


class FirstBatches:
    """The first ``n`` batches of a re-iterable ``source``, itself re-iterable (each pass starts anew)."""

    def __init__(self, source: Iterable[Batch], n: int) -> None:
        self.source, self.n = source, n

    def __iter__(self) -> Iterator[Batch]:
        return islice(iter(self.source), self.n)

    def sizes(self) -> Iterator[int]:
        return islice(batch_sizes(self.source), self.n)
