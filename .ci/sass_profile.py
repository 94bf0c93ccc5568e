"""Where a kernel's instructions go, from the per-instruction counts `.ci/gpu-run` PROFILE exports
(`sass-<problem>-<kernel>.csv`: `ncu --import R --page source --csv --print-source sass`).

    python .ci/sass_profile.py sass-1d-long-fna_fwd_kernel.csv [--per N] [--regions 25]
    python .ci/sass_profile.py sass-2d-large-fna_fwd_tma.csv --stalls 25

Prints the executed warp instructions by opcode (with their share of the sampled stalls), then the
hot regions: runs of consecutive instructions executed the same number of times (a basic block,
or several in a row), largest total first, with their opcode mix and their main stall reasons.
`--per N` divides the counts (e.g. by CTAs x warps x walk steps, to read them per step and
warp). `--stalls N` adds the stall reasons over the kernel and the N instructions with the most
stall samples (a sample lands on the instruction a warp waits to issue: after a barrier it is the
one behind it), which is where session 18 found the box walk's warpgroups waiting on each other's
turns in the rounds they had no work in.
"""
from __future__ import annotations

import argparse
import collections
import csv
import re

OPCODE = re.compile(r"^(@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)")


def load(path: str):
    """[(opcode, source, executed, stall samples, {stall reason: samples})] in address order.
    The reasons are the report's `stall_*` columns (all samples, issued or not), where present."""
    rows = list(csv.reader(open(path, newline="")))
    header = next(i for i, r in enumerate(rows) if "Instructions Executed" in r)
    names = rows[header]
    src, count = names.index("Source"), names.index("Instructions Executed")
    stall = names.index("Warp Stall Sampling (All Samples)")
    reasons = {name[len("stall_"):]: k for k, name in enumerate(names)
               if name.startswith("stall_") and "Not Issued" not in name}
    out = []
    for r in rows[header + 1:]:
        if len(r) <= max(src, count, stall):
            continue
        try:
            n = int(r[count])
        except ValueError:
            continue
        why = {}
        for name, k in reasons.items():
            try:
                if k < len(r) and int(r[k] or 0):
                    why[name] = int(r[k])
            except ValueError:
                pass
        m = OPCODE.match(r[src].strip())
        out.append((m.group(2) if m else r[src].strip(), r[src].strip(), n, int(r[stall] or 0),
                    why))
    return out


def top_reasons(counter: collections.Counter, stalls: int, k: int = 3) -> str:
    return ", ".join(f"{name} {100 * v / stalls:.1f}%" for name, v in counter.most_common(k))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--per", type=float, default=1.0, help="divide the counts by this")
    ap.add_argument("--regions", type=int, default=25, help="how many hot regions to list")
    ap.add_argument("--opcodes", type=int, default=30, help="how many opcodes to list")
    ap.add_argument("--stalls", type=int, default=0,
                    help="list the stall reasons and this many most-stalled instructions")
    args = ap.parse_args()
    ins = load(args.csv)
    total = sum(n for _, _, n, _, _ in ins)
    stalls = max(1, sum(s for _, _, _, s, _ in ins))
    print(f"{len(ins)} instructions, {total / 1e6:.1f} M warp instructions executed, "
          f"{stalls} stall samples")
    by_op, stall_op = collections.Counter(), collections.Counter()
    for op, _, n, s, _ in ins:
        by_op[op] += n
        stall_op[op] += s
    print("by opcode (executed / --per, share, share of stall samples):")
    for op, n in by_op.most_common(args.opcodes):
        print(f"  {op:10s} {n / args.per:14.1f} {100 * n / total:5.1f}%  "
              f"stalls {100 * stall_op[op] / stalls:5.1f}%")
    regions, current = [], None
    for i, (_, _, n, s, _) in enumerate(ins):
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
        why = collections.Counter()
        for k in range(r["first"], r["last"] + 1):
            why.update(ins[k][4])
        print(f"  x{r['n'] / args.per:10.2f}  len {length:4d}  [{r['first']}..{r['last']}]  "
              f"total {r['n'] * length / args.per:12.1f}  stalls {100 * r['stall'] / stalls:4.1f}%  "
              + ", ".join(f"{k}:{v}" for k, v in mix.most_common(8))
              + (f"  ({top_reasons(why, stalls)})" if why else ""))
    if args.stalls:
        why = collections.Counter()
        for *_, w in ins:
            why.update(w)
        print("stall reasons (share of all samples): " + (top_reasons(why, stalls, 12) or "-"))
        print(f"most-stalled instructions (index, share of samples, executed / --per, reasons):")
        ranked = sorted(range(len(ins)), key=lambda k: -ins[k][3])[:args.stalls]
        for k in ranked:
            _, source, n, s, w = ins[k]
            print(f"  {k:6d} {100 * s / stalls:5.1f}%  x{n / args.per:10.2f}  "
                  f"{top_reasons(collections.Counter(w), stalls, 2):32s}  {source[:70]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
