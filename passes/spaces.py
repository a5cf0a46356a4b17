"""Channel spaces: union-find over aligned channel ranges, with refinement.

Every channel-carrying tensor dimension is a list of segments ``(atom, repeat)``. An *atom* is a range of
channels created by one producer (a conv/linear output). Atoms that must be pruned identically are
*unified* into one class; unified atoms always have the same length and are aligned index by index, so a
class is pruned by one set of kept indices. When an op needs a boundary inside an atom (a slice, a split,
an add of two differently concatenated tensors) the atom is *refined*: it and every atom of its class are
cut at the same offset, so alignment survives.

Worked example (a DenseNet-style concat feeding a residual add)::

    a = conv1(x)            atom A (16)          dims: [A]
    b = conv2(x)            atom B (16)          dims: [B]
    c = cat([a, b], 1)                           dims: [A, B]
    d = conv3(x)            atom D (32)          dims: [D]
    e = c + d               unify [A, B] ~ [D]:
                              D is longer than A -> refine D at 16 into D1 (16), D2 (16)
                              union(A, D1); union(B, D2)
    classes: {A, D1} {B, D2}  -> two groups of 16; conv3's output rows are cut by both, offsets 0 and 16

A *repeat* of r means each channel occupies r consecutive positions (``flatten`` of C x H x W gives
repeat H*W; a depthwise conv with channel multiplier m gives repeat m).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

__all__ = ["Seg", "SpaceTable"]

Seg = tuple[int, int]  # (atom, repeat)

_MAX_REASONS = 8


class SpaceTable:
    """Atoms, their refinement tree, and the union-find classes of leaf atoms."""

    def __init__(self) -> None:
        self.length: list[int] = []
        self.children: dict[int, tuple[int, int]] = {}
        self._parent: list[int] = []
        self._members: dict[int, list[int]] = {}
        self._pins: dict[int, list[str]] = {}
        self.origin: list[str] = []

    # ----------------------------------------------------------------- atoms
    def new(self, length: int, origin: str, pin: str | None = None) -> int:
        """A fresh atom (its own class) of ``length`` channels, optionally pinned with a reason."""
        if length <= 0:
            raise ValueError(f"atom length must be positive, got {length}")
        a = len(self.length)
        self.length.append(length)
        self._parent.append(a)
        self._members[a] = [a]
        self._pins[a] = [pin] if pin else []
        self.origin.append(origin)
        return a

    def find(self, a: int) -> int:
        root = a
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[a] != root:
            self._parent[a], a = root, self._parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.length[ra] != self.length[rb]:  # pragma: no cover - guarded by callers
            raise AssertionError("union of atoms of different lengths")
        if len(self._members[ra]) < len(self._members[rb]):
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._members[ra].extend(self._members.pop(rb))
        self._add_reasons(ra, self._pins.pop(rb))

    def _add_reasons(self, root: int, reasons: Iterable[str]) -> None:
        have = self._pins[root]
        for r in reasons:
            if r not in have and len(have) < _MAX_REASONS:
                have.append(r)

    def split(self, atom: int, k: int) -> None:
        """Refine leaf ``atom`` and every atom of its class at channel offset ``k``."""
        n = self.length[atom]
        if not 0 < k < n or atom in self.children:  # pragma: no cover - guarded by callers
            raise AssertionError("bad split")
        root = self.find(atom)
        members, reasons = self._members.pop(root), self._pins.pop(root)
        left: list[int] = []
        right: list[int] = []
        for m in members:
            lo = self.new(k, self.origin[m])
            hi = self.new(n - k, self.origin[m])
            self.children[m] = (lo, hi)
            left.append(lo)
            right.append(hi)
        for side in (left, right):
            for x in side[1:]:
                self.union(side[0], x)
            self._add_reasons(self.find(side[0]), reasons)

    # -------------------------------------------------------------- segments
    def leaves(self, segs: Iterable[Seg]) -> list[Seg]:
        return list(self._walk(list(reversed(list(segs)))))

    def _walk(self, stack: list[Seg]) -> Iterator[Seg]:
        """The leaves of ``stack`` (segments, last one first), split atoms expanded into their halves when
        popped; the caller may push onto ``stack`` between items (an atom it has just split)."""
        while stack:
            a, r = stack.pop()
            if a in self.children:
                lo, hi = self.children[a]
                stack.append((hi, r))
                stack.append((lo, r))
            else:
                yield a, r

    def size(self, segs: Iterable[Seg]) -> int:
        return sum(self.length[a] * r for a, r in segs)

    def _cut(self, segs: Sequence[Seg], pos: int) -> bool:
        p = 0
        for a, r in self.leaves(segs):
            size = self.length[a] * r
            if p < pos < p + size:
                off = pos - p
                if off % r:
                    return False
                self.split(a, off // r)
                return True
            p += size
        return True

    def slice(self, segs: Sequence[Seg], start: int, stop: int) -> tuple[Seg, ...] | None:
        """Positions ``[start, stop)`` of a dimension; None when a cut falls inside a repeat block."""
        if not (self._cut(segs, start) and self._cut(segs, stop)):
            return None
        out: list[Seg] = []
        p = 0
        for a, r in self.leaves(segs):
            size = self.length[a] * r
            if start <= p and p + size <= stop:
                out.append((a, r))
            p += size
        return tuple(out)

    def pieces(self, segs: Sequence[Seg], count: int) -> list[tuple[Seg, ...]] | None:
        """``[slice(segs, i * step, (i + 1) * step) for i in range(count)]`` (``step = size / count``) in one
        pass over the leaves instead of ``count`` (a grouped conv of many groups); None when a cut falls
        inside a repeat block. The same cuts are made in the same order (a cut that fails does not stop
        the later ones, as with ``slice`` per piece), so the atoms are split exactly the same way."""
        step = self.size(segs) // count
        out: list[tuple[Seg, ...]] = []
        cur: list[Seg] = []
        failed = False
        p, k = 0, 1  # position so far; the next cut is at k * step (for k < count)
        stack = list(reversed(list(segs)))
        for a, r in self._walk(stack):
            size = self.length[a] * r
            if k < count and p < k * step < p + size:
                off = k * step - p
                if off % r:
                    failed, k = True, k + 1  # this cut cannot be made; the next may fall in this leaf too
                else:
                    self.split(a, off // r)  # its two halves come next
                stack.append((a, r))
                continue
            cur.append((a, r))
            p += size
            if k < count and p == k * step:
                out.append(tuple(cur))
                cur, k = [], k + 1
        out.append(tuple(cur))
        return None if failed else out

    def scale(self, segs: Sequence[Seg], factor: int) -> tuple[Seg, ...]:
        """The same channels with every channel repeated ``factor`` times more."""
        return tuple((a, r * factor) for a, r in segs)

    def unify(self, s1: Sequence[Seg], s2: Sequence[Seg]) -> bool:
        """Tie position ``i`` of ``s1`` to position ``i`` of ``s2``. False when the layouts cannot align
        (different repeats at the same position, or different sizes); the caller then pins both."""
        if self.size(s1) != self.size(s2):
            return False
        st1 = list(reversed(list(s1)))
        st2 = list(reversed(list(s2)))
        while st1 and st2:
            a, r1 = st1.pop()
            b, r2 = st2.pop()
            if a in self.children or b in self.children:
                for st, (x, r) in ((st1, (a, r1)), (st2, (b, r2))):
                    if x in self.children:
                        lo, hi = self.children[x]
                        st.extend([(hi, r), (lo, r)])
                    else:
                        st.append((x, r))
                continue
            if r1 != r2:
                return False
            la, lb = self.length[a], self.length[b]
            if la > lb:
                self.split(a, lb)
            elif lb > la:
                self.split(b, la)
            else:
                self.union(a, b)
                continue
            st1.append((a, r1))
            st2.append((b, r2))
        return not st1 and not st2

    # ----------------------------------------------------------------- pins
    def pin(self, segs: Iterable[Seg], reason: str) -> None:
        for a, _ in self.leaves(segs):
            self._add_reasons(self.find(a), [reason])

    def reasons(self, atom: int) -> list[str]:
        return list(self._pins[self.find(atom)])

    def members(self, atom: int) -> list[int]:
        """The leaf atoms of ``atom``'s class (``atom`` a leaf)."""
        return list(self._members[self.find(atom)])

    def classes(self) -> dict[int, list[int]]:
        """Root -> leaf members, for every class."""
        return {r: list(m) for r, m in self._members.items()}
