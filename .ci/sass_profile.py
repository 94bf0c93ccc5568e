"""Where a kernel's instructions go, from the per-instruction counts `.ci/gpu-run` PROFILE exports
(`sass-<problem>-<kernel>.csv`: `ncu --import R --page source --csv --print-source sass`).

    python .ci/sass_profile.py sass-1d-long-fna_fwd_kernel.csv [--per N] [--regions 25]

Prints the executed warp instructions by opcode (with their share of the sampled stalls), then the
hot regions: runs of consecutive instructions executed the same number of times (a basic block,
or several in a row), largest total first, with their opcode mix. `--per N` divides the counts
(e.g. by CTAs x warps x walk steps, to read them per step and warp).
"""
from __future__ import annotations

import argparse
import collections
import csv
import re

OPCODE = re.compile(r"^(@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)")


def load(path: str):
    """[(opcode, source, executed, stall samples)] in address order."""
    rows = list(csv.reader(open(path, newline="")))
    header = next(i for i, r in enumerate(rows) if "Instructions Executed" in r)
    names = rows[header]
    src, count = names.index("Source"), names.index("Instructions Executed")
    stall = names.index("Warp Stall Sampling (All Samples)")
    out = []
    for r in rows[header + 1:]:
        if len(r) <= max(src, count, stall):
            continue
        try:
            n = int(r[count])
        except ValueError:
            continue
        m = OPCODE.match(r[src].strip())
        out.append((m.group(2) if m else r[src].strip(), r[src].strip(), n, int(r[stall] or 0)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--per", type=float, default=1.0, help="divide the counts by this")
    ap.add_argument("--regions", type=int, default=25, help="how many hot regions to list")
    ap.add_argument("--opcodes", type=int, default=30, help="how many opcodes to list")
    args = ap.parse_args()
    ins = load(args.csv)
    total = sum(n for _, _, n, _ in ins)
    stalls = max(1, sum(s for *_, s in ins))
    print(f"{len(ins)} instructions, {total / 1e6:.1f} M warp instructions executed, "
          f"{stalls} stall samples")
    by_op, stall_op = collections.Counter(), collections.Counter()
    for op, _, n, s in ins:
        by_op[op] += n
        stall_op[op] += s
    print("by opcode (executed / --per, share, share of stall samples):")
    for op, n in by_op.most_common(args.opcodes):
        print(f"  {op:10s} {n / args.per:14.1f} {100 * n / total:5.1f}%  "
              f"stalls {100 * stall_op[op] / stalls:5.1f}%")
    regions, current = [], None
    for i, (_, _, n, s) in enumerate(ins):
        if current is not None and current["n"] == n:
            current["last"] = i
            current["stall"] += s
        else:
            current = {"n": n, "first": i, "last": i, "stall": s}
            regions.append(current)
    regions = [r for r in regions if r["n"] > 0]
    regions.sort(key=lambda r: -r["n"] * (r["last"] - r["first"] + 1))
    print("hot regions (count / --per, length, instruction indices, total, stalls, opcode mix):")
    for r in regions[:args.regions]:
        length = r["last"] - r["first"] + 1
        mix = collections.Counter(ins[k][0] for k in range(r["first"], r["last"] + 1))
        print(f"  x{r['n'] / args.per:10.2f}  len {length:4d}  [{r['first']}..{r['last']}]  "
              f"total {r['n'] * length / args.per:12.1f}  stalls {100 * r['stall'] / stalls:4.1f}%  "
              + ", ".join(f"{k}:{v}" for k, v in mix.most_common(8)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
