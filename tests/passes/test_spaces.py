"""Channel-space algebra against a brute-force union-find over individual channels."""

from __future__ import annotations

from fxprune.passes.spaces import SpaceTable
from hypothesis import given, settings
from hypothesis import strategies as st


def _classes_by_channel(sp: SpaceTable, atoms: list[int]) -> dict[tuple[int, int], tuple[int, int]]:
    """(original atom, channel) -> (class root, offset inside the leaf)."""
    out = {}
    for a in atoms:
        for i in range(sp.length[a]):
            leaf, off = a, i
            while leaf in sp.children:
                lo, hi = sp.children[leaf]
                if off < sp.length[lo]:
                    leaf = lo
                else:
                    off -= sp.length[lo]
                    leaf = hi
            out[(a, i)] = (sp.find(leaf), off)
    return out


class _Brute:
    def __init__(self) -> None:
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(self, x: tuple[int, int]) -> tuple[int, int]:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            x = self.parent[x]
        return x

    def union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        self.parent[self.find(a)] = self.find(b)


def test_worked_example_from_docstring() -> None:
    sp = SpaceTable()
    a, b, d = sp.new(16, "a"), sp.new(16, "b"), sp.new(32, "d")
    assert sp.unify([(a, 1), (b, 1)], [(d, 1)])
    d1, d2 = sp.children[d]
    assert sp.find(a) == sp.find(d1) and sp.find(b) == sp.find(d2) and sp.find(a) != sp.find(b)


def test_repeat_mismatch_refuses() -> None:
    sp = SpaceTable()
    a, b = sp.new(4, "a"), sp.new(8, "b")
    assert not sp.unify([(a, 2)], [(b, 1)])


def test_slice_inside_repeat_block_refuses() -> None:
    sp = SpaceTable()
    a = sp.new(4, "a")
    assert sp.slice([(a, 3)], 3, 9) is not None
    assert sp.slice([(a, 3)], 1, 9) is None


def test_pin_survives_split_and_union() -> None:
    sp = SpaceTable()
    a, b = sp.new(8, "a"), sp.new(4, "b")
    sp.pin([(b, 1)], "pinned b")
    piece = sp.slice([(a, 1)], 2, 6)
    assert piece is not None and sp.unify(piece, [(b, 1)])
    lo = sp.leaves([(a, 1)])
    reasons = [sp.reasons(x) for x, _ in lo]
    assert reasons == [[], ["pinned b"], []]


ops = st.lists(
    st.tuples(
        st.sampled_from(["slice_unify", "cat_unify"]),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=2, max_size=6), program=ops)
def test_unify_matches_brute_force(lengths: list[int], program: list[tuple[str, int, int, int]]) -> None:
    sp = SpaceTable()
    atoms = [sp.new(n, f"a{i}") for i, n in enumerate(lengths)]
    brute = _Brute()
    full = [(a, 1) for a in atoms]
    positions = [(a, i) for a in atoms for i in range(sp.length[a])]
    total = len(positions)
    for kind, r1, r2, r3 in program:
        n = 1 + r1 % total
        s1 = r2 % (total - n + 1)
        s2 = r3 % (total - n + 1)
        if kind == "cat_unify":  # unify two concatenations given by rotating the atom list
            k = r1 % len(atoms)
            order = atoms[k:] + atoms[:k]
            segs2 = [(a, 1) for a in order]
            flat2 = [(a, i) for a in order for i in range(sp.length[a])]
            assert sp.unify(full, segs2)
            for p, q in zip(positions, flat2, strict=True):
                brute.union(p, q)
        else:
            p1 = sp.slice(full, s1, s1 + n)
            p2 = sp.slice(full, s2, s2 + n)
            assert p1 is not None and p2 is not None and sp.size(p1) == sp.size(p2) == n
            assert sp.unify(p1, p2)
            for i in range(n):
                brute.union(positions[s1 + i], positions[s2 + i])
    got = _classes_by_channel(sp, atoms)
    for p in positions:
        for q in positions:
            assert (got[p] == got[q]) == (brute.find(p) == brute.find(q)), (p, q)


def _slices_per_piece(sp: SpaceTable, segs: list[tuple[int, int]], count: int) -> list[tuple] | None:
    step = sp.size(segs) // count
    got = [sp.slice(segs, i * step, (i + 1) * step) for i in range(count)]
    return None if any(p is None for p in got) else got  # type: ignore[return-value]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    repeats=st.lists(st.integers(1, 3), min_size=5, max_size=5),
    tie=st.booleans(),
    count=st.integers(1, 8),
)
def test_pieces_equals_one_slice_per_piece(
    lengths: list[int], repeats: list[int], tie: bool, count: int
) -> None:
    """``pieces`` (one pass, for grouped convs) makes the same cuts as ``slice`` per piece: the same atoms,
    classes and leaves afterwards, the same channels per piece, and None exactly when a cut fails."""

    def build() -> tuple[SpaceTable, list[tuple[int, int]]]:
        sp = SpaceTable()
        atoms = [sp.new(n, f"a{i}") for i, n in enumerate(lengths)]
        if tie and len(atoms) > 1 and sp.length[atoms[0]] == sp.length[atoms[-1]]:
            sp.union(atoms[0], atoms[-1])  # one class at two positions of the same dimension
        return sp, [(a, repeats[i]) for i, a in enumerate(atoms)]

    sp1, segs1 = build()
    sp2, segs2 = build()
    if sp1.size(segs1) % count:
        return
    want = _slices_per_piece(sp1, segs1, count)
    got = sp2.pieces(segs2, count)
    assert (got is None) == (want is None)
    assert sp1.children == sp2.children and sp1.length == sp2.length
    assert [sp1.find(a) for a in range(len(sp1.length))] == [sp2.find(a) for a in range(len(sp2.length))]
    if got is not None and want is not None:
        assert [sp2.leaves(p) for p in got] == [sp1.leaves(p) for p in want]
