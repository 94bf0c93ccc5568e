"""natten::tile_mask and the column masks (cuda/include/natten/tile_mask.h), the bit sets with
which the fused kernels test a whole tile row against a window, checked on the host against a
per-token test."""
import itertools
import random

import pytest


def _shapes():
    """Every tile shape of at most 64 tokens: 2^logs per axis."""
    return [ls for ls in itertools.product(range(7), repeat=3) if sum(ls) <= 6]


def _expected(logs, lo, hi):
    bits = 0
    for r in range(64):
        off = (r >> (logs[1] + logs[2]), (r >> logs[2]) % (1 << logs[1]), r % (1 << logs[2]))
        if all(lo[a] <= off[a] < hi[a] for a in range(3)):
            bits |= 1 << r
    return bits


@pytest.mark.parametrize("logs", _shapes(), ids=lambda ls: "x".join(str(1 << x) for x in ls))
def test_tile_mask_matches_a_test_per_token(logs):
    ext = pytest.importorskip("jax_natten._natten_ext")
    rng = random.Random(hash(logs))
    boxes = [((0, 0, 0), tuple(1 << x for x in logs)), ((0, 0, 0), (0, 0, 0))]
    for _ in range(200):
        lo, hi = [], []
        for x in logs:
            a, b = sorted(rng.randint(0, 1 << x) for _ in range(2))
            lo.append(a)
            hi.append(b)
        boxes.append((tuple(lo), tuple(hi)))
    for lo, hi in boxes:
        assert ext.tile_mask(list(logs), list(lo), list(hi)) == _expected(logs, lo, hi), (lo, hi)


def test_tile_mask_refuses_bad_boxes():
    ext = pytest.importorskip("jax_natten._natten_ext")
    with pytest.raises(ValueError):
        ext.tile_mask([2, 2, 2], [0, 0, 3], [4, 4, 2])  # lo > hi
    with pytest.raises(ValueError):
        ext.tile_mask([3, 3, 1], [0, 0, 0], [8, 8, 2])  # 128 tokens


def _column_shapes():
    """Tiles of 16 to 128 tokens, two or more on the last axis (column_bits' domain)."""
    return [ls for ls in itertools.product(range(8), repeat=3) if 4 <= sum(ls) <= 7 and ls[2] >= 1]


@pytest.mark.parametrize("logs", _column_shapes(), ids=lambda ls: "x".join(str(1 << x) for x in ls))
def test_column_bits_match_a_test_per_column(logs):
    """natten::column_* (tile_mask.h; the TMA forward's box walk): the thread's columns
    8 nb + 2 quad + c of a tile at `origin` inside a window, as bit nb + 16 c, against a test per
    column, windows reaching past the tile on either side included."""
    ext = pytest.importorskip("jax_natten._natten_ext")
    rng = random.Random(hash(logs))
    blocks = 1 << (sum(logs) - 3)
    for _ in range(60):
        origin = [rng.randint(0, 40) for _ in range(3)]
        start = [rng.randint(0, 60) for _ in range(3)]
        end = [s + rng.randint(0, 50) for s in start]
        for quad in range(4):
            want = 0
            for nb in range(blocks):
                for c in range(2):
                    col = 8 * nb + 2 * quad + c
                    off = (col >> (logs[1] + logs[2]), (col >> logs[2]) % (1 << logs[1]),
                           col % (1 << logs[2]))
                    if all(start[a] <= origin[a] + off[a] < end[a] for a in range(3)):
                        want |= 1 << (nb + 16 * c)
            got = ext.column_bits(list(logs), quad, start, end, origin)
            assert got == want, (quad, start, end, origin)


def test_column_bits_refuses_what_the_kernel_does_not_take():
    ext = pytest.importorskip("jax_natten._natten_ext")
    with pytest.raises(ValueError):
        ext.column_bits([4, 3, 0], 0, [0, 0, 0], [1, 1, 1], [0, 0, 0])  # one token on z
    with pytest.raises(ValueError):
        ext.column_bits([3, 3, 2], 0, [0, 0, 0], [1, 1, 1], [0, 0, 0])  # 256 tokens
