"""The benchmark problem set: the six problems of the peer measurements, small ones of ours, and
GPU-sized ones of ours beyond the six.

The "shared" group has the shapes and names of the problems that the peer measurements of
`BENCHMARKS.md` (PyTorch FlexAttention, cuDNN, dense XLA) were taken on, so the numbers line up.
The "small" group fits a CPU in seconds and covers what the shared set does not: float32, dilation
on a small grid, odd non-square shapes with stride and per-axis causality, 3-D, and GQA.
The "more" group is GPU-sized shapes the peers were not measured on (other window sizes, head
dims, odd extents and 3-D boxes): the kernels' tiles are chosen per problem, so a change tuned on
the six is checked against these too (A/B, against a base version).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

GROUPS = ("shared", "small", "more")


def _per_axis(value, rank: int, name: str) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} has {len(value)} entries for a {rank}-D problem")
        return tuple(value)
    return (value,) * rank


@dataclasses.dataclass(frozen=True)
class Problem:
    """One NA problem. Per-axis fields take an int/bool or one value per spatial axis."""

    name: str
    batch: int
    heads: int
    spatial: tuple
    head_dim: int
    kernel: tuple
    dilation: tuple = 1
    causal: tuple = False
    stride: tuple = 1
    kv_heads: Optional[int] = None   # None: same as heads
    dtype: Optional[str] = None      # the dtype used when --dtype is not given (None: bf16)
    group: str = "custom"
    about: str = ""

    def __post_init__(self):
        spatial = tuple(int(s) for s in self.spatial)
        rank = len(spatial)
        if not 1 <= rank <= 3:
            raise ValueError(f"problem {self.name!r}: 1, 2 or 3 spatial axes, got {spatial}")
        set_ = lambda field, v: object.__setattr__(self, field, v)  # noqa: E731 (frozen)
        set_("spatial", spatial)
        set_("kernel", tuple(int(k) for k in _per_axis(self.kernel, rank, "kernel")))
        set_("dilation", tuple(int(d) for d in _per_axis(self.dilation, rank, "dilation")))
        set_("stride", tuple(int(s) for s in _per_axis(self.stride, rank, "stride")))
        set_("causal", tuple(bool(c) for c in _per_axis(self.causal, rank, "causal")))
        if self.kv_heads is None:
            set_("kv_heads", self.heads)

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def window(self) -> int:
        return math.prod(self.kernel)

    def useful_flops(self, op: str = "attention") -> int:
        """Forward useful FLOPs (2 per multiply-add): 4*B*H*N*prod(kernel)*D for attention
        (QK^T and PV), half that for qk or av alone. Every query counts a full window, causal
        or not, as in the peer scripts."""
        full = 4 * self.batch * self.heads * self.tokens * self.window * self.head_dim
        return full if op == "attention" else full // 2

    def shape(self) -> str:
        """A compact description: B64 H4 56x56 D32 k7x7 (+ d/s/causal/GQA only when set)."""
        x = lambda t: "x".join(str(int(v)) for v in t)  # noqa: E731
        parts = [f"B{self.batch}", f"H{self.heads}" + (f"/{self.kv_heads}kv" if
                                                        self.kv_heads != self.heads else ""),
                 x(self.spatial), f"D{self.head_dim}", f"k{x(self.kernel)}"]
        if any(d != 1 for d in self.dilation):
            parts.append(f"d{x(self.dilation)}")
        if any(s != 1 for s in self.stride):
            parts.append(f"s{x(self.stride)}")
        if any(self.causal):
            parts.append("causal " + "".join("TF"[not c] for c in self.causal))
        return " ".join(parts)

    def as_dict(self) -> dict:
        return dict(name=self.name, batch=self.batch, heads=self.heads, kv_heads=self.kv_heads,
                    spatial=list(self.spatial), head_dim=self.head_dim, kernel=list(self.kernel),
                    stride=list(self.stride), dilation=list(self.dilation),
                    causal=list(self.causal), group=self.group)


P = Problem
PROBLEMS = [
    # --- shared with the peer measurements (BENCHMARKS.md): bf16 ----------------------------------
    P("nat-2d-small", 64, 4, (56, 56), 32, 7, group="shared",
      about="NAT/DiNAT stage-1 sized 2-D layer: many small windows"),
    P("2d-large", 4, 16, (128, 128), 64, 31, group="shared",
      about="large 2-D windows (961 keys per query)"),
    P("2d-dilated", 4, 16, (128, 128), 64, 15, dilation=2, group="shared",
      about="dilated 2-D (DiNAT style)"),
    P("1d-long", 2, 16, (32768,), 64, 2049, group="shared",
      about="long 1-D sequence, sliding window"),
    P("1d-causal", 2, 16, (32768,), 64, 2048, causal=True, group="shared",
      about="long 1-D causal sliding window (compare cuDNN local_window_size)"),
    P("3d-video", 1, 24, (16, 48, 48), 128, (7, 15, 15), group="shared",
      about="3-D video windows, head_dim 128"),
    # --- small ones of ours (CPU-sized; also a launch-overhead check on a GPU) -------------------
    P("1d-4k-f32", 2, 4, (4096,), 32, 13, dtype="f32", group="small",
      about="1-D 4096 tokens, k=13, float32"),
    P("2d-64-dil2", 2, 4, (64, 64), 32, 7, dilation=2, group="small",
      about="2-D 64x64, k=7, dilation 2"),
    P("3d-small", 1, 4, (8, 16, 16), 32, 3, group="small",
      about="3-D 8x16x16, k=3"),
    P("2d-gqa", 2, 8, (32, 32), 64, 7, kv_heads=2, group="small",
      about="2-D GQA: 8 query heads share 2 kv heads"),
    P("2d-odd", 2, 4, (48, 40), 32, (5, 7), stride=(2, 3), causal=(True, False), group="small",
      about="non-square, per-axis kernel, stride (2,3), causal on the first axis"),
    # --- GPU-sized ones of ours beyond the shared six (no peer measurements) ---------------------
    P("2d-mid", 8, 8, (64, 64), 64, 13, group="more",
      about="ViT-sized 2-D layer, mid-sized window"),
    P("2d-rect-d128", 2, 16, (40, 200), 128, (9, 25), group="more",
      about="non-square grid and window, head dim 128"),
    P("2d-odd-dil", 4, 8, (90, 77), 64, (11, 9), dilation=(2, 3), group="more",
      about="odd extents, per-axis dilation"),
    P("3d-mid", 2, 8, (8, 32, 32), 64, (3, 7, 7), group="more",
      about="3-D, head dim 64, small temporal window"),
    P("3d-causal", 1, 16, (12, 24, 40), 128, (5, 9, 11), causal=(True, False, False),
      group="more", about="3-D, causal on time, head dim 128"),
    P("1d-d32", 2, 16, (16384,), 32, 513, group="more",
      about="1-D at head dim 32 (the TMA kernels' 64-column tiles)"),
]
del P

BY_NAME = {p.name: p for p in PROBLEMS}


def select(spec: str) -> list:
    """Problems named by a comma list of names and groups ('all', 'shared', 'small')."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "all":
            found = list(PROBLEMS)
        elif item in GROUPS:
            found = [p for p in PROBLEMS if p.group == item]
        elif item in BY_NAME:
            found = [BY_NAME[item]]
        else:
            raise ValueError(f"unknown problem {item!r}; names: {', '.join(BY_NAME)}; "
                             f"groups: all, {', '.join(GROUPS)}")
        out += [p for p in found if p not in out]
    return out


def listing() -> str:
    """The --list text: one line per problem, grouped."""
    width = max(len(p.name) for p in PROBLEMS)
    shape_w = max(len(p.shape()) for p in PROBLEMS)
    lines = []
    for group in GROUPS:
        lines.append(f"{group}:")
        for p in (p for p in PROBLEMS if p.group == group):
            gflop = p.useful_flops() / 1e9
            lines.append(f"  {p.name:<{width}}  {p.shape():<{shape_w}}  {p.dtype or 'bf16':<4}  "
                         f"{gflop:9.2f} GFLOP fwd  {p.about}")
    return "\n".join(lines)
