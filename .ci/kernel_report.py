"""What ptxas says about the Hopper kernels, without a GPU: registers, stack, spills and wgmma
serialization, per kernel instance.

    python .ci/kernel_report.py                 # cuda/fna/*.cu for sm_90a, a table
    python .ci/kernel_report.py cuda/fna/forward_ws.cu --arch 90a --filter ws_kernel

Compiles each file as the build does (same flags, an sm_90a image) with `-Xptxas -v`, one nvcc per
file in parallel, and reads ptxas's report. ptxas says when it gives up on asynchronous wgmma
(every MMA of the kernel then waits for the one before it) in "ptxas info" lines with codes
C7510..C7520 that contain "serialized" (e.g. C7512: too few registers; C7514: a non-wgmma
instruction reads an accumulator in flight; C7518: a divergent path in flight): easy to filter out
with the rest of the info lines. Exit status 1 when any kernel is serialized (CI runs this), so a
change that costs the tensor cores their overlap fails before it reaches a GPU. C7519 (a
warpgroup.arrive injected between MMAs) is reported, not failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\w+)'")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
                   r"(?P<ld>\d+) bytes spill loads")
USED = re.compile(r"Used (?P<regs>\d+) registers")
CODE = re.compile(r"\((?P<code>C75\d\d)\)(?P<text>[^']*)'(?P<name>[^']+)'")


def ffi_include() -> str:
    import jax.ffi
    return jax.ffi.include_dir()


def compile_report(path: str, arch: str, include: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-DNATTEN_BUILT_SM90A=1",
               "-I", os.path.join(ROOT, "cuda", "include"), "-isystem", include,
               "-Xptxas", "-v", "-c", path, "-o", os.path.join(tmp, "k.o")]
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed on {path}:\n{run.stderr[-4000:]}")
    return run.stderr


def short(name: str) -> str:
    """A readable kernel name: demangled, namespaces and the argument list dropped."""
    if shutil.which("c++filt"):
        name = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    name = re.sub(r"natten::gpu::fna::(\(anonymous namespace\)::)?", "", name)
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\((natten::gpu::fna::)?FnaArgs, (natten::gpu::fna::)?FnaPtrs\)$", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")


def parse(text: str) -> dict:
    kernels: dict = {}
    current = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = kernels.setdefault(m["name"], {"codes": []})
            continue
        m = CODE.search(line)
        if m:
            kernels.setdefault(m["name"], {"codes": []})["codes"].append(
                (m["code"], "serialized" in m["text"]))
            continue
        if current is None:
            continue
        m = FRAME.search(line)
        if m:
            current.update(stack=int(m["stack"]), st=int(m["st"]), ld=int(m["ld"]))
        m = USED.search(line)
        if m:
            current["regs"] = int(m["regs"])
    return kernels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="default: cuda/fna/*.cu")
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = ap.parse_args()
    if not shutil.which("nvcc"):
        print("kernel_report: no nvcc", file=sys.stderr)
        return 2
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "cuda", "fna", "*.cu")))
    include = ffi_include()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        reports = dict(zip(files, pool.map(lambda f: compile_report(f, args.arch, include),
                                           files)))
    serialized = 0
    rows = [("file", "kernel", "regs", "stack", "spill st/ld", "ptxas C75xx")]
    for path, text in reports.items():
        for name, k in parse(text).items():
            if args.filter and args.filter not in name:
                continue
            codes = sorted({c for c, _ in k["codes"]})
            bad = any(s for _, s in k["codes"])
            serialized += bad
            rows.append((os.path.basename(path), short(name), str(k.get("regs", "?")),
                         str(k.get("stack", "?")), f"{k.get('st', '?')}/{k.get('ld', '?')}",
                         (" ".join(codes) + (" SERIALIZED" if bad else "")) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if serialized:
        print(f"\n{serialized} kernel(s) with serialized wgmma (see the C75xx codes above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
