"""The benchmark CLI (`python -m jax_natten.benchmark`) on tiny problems: table, JSON, skips."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

import jax_natten
from jax_natten.benchmark import cli, problems, report, runner, timing

TINY = ["--spatial", "12,10", "--kernel", "3,5", "--heads", "2", "--dim", "8", "--batch", "1",
        "--iters", "3", "--warmup", "1", "--sample-ms", "1", "--rotate-mb", "1"]


def _records_by(records):
    return {(r["backend"], r["pass"]): r for r in records}


def test_cli_tiny_problem(tmp_path, capsys):
    peers = tmp_path / "peers.jsonl"
    peers.write_text('{"jax": "x", "devices": ["TestGPU"]}\n'
                     '{"problem": "custom", "flex_fwd_ms": 0.5, "flex_fwdbwd_ms": 2.0}\n'
                     '{"problem": "other", "flex_fwd_ms": 9.0}\n')
    out_json = tmp_path / "bench.json"
    rc = cli.main(TINY + ["--backends", "reference,cpu,fused", "--baseline", "reference",
                          "--passes", "fwd,fwdbwd", "--dtype", "bf16", "--memory", "--quiet",
                          "--json", str(out_json), "--peers", str(peers)])
    assert rc == 0
    text = capsys.readouterr().out

    records = json.loads(out_json.read_text())
    assert len(records) == 3 * 2 + 2  # 3 backends x 2 passes + 2 peer results
    by = _records_by(records)
    cpu_built = jax_natten.backend_available("cpu", "cpu")  # the runner puts it on the host
    for ps in ("fwd", "fwdbwd"):
        ref = by[("reference", ps)]
        assert ref["status"] == "ok" and ref["ms"] > 0 and ref["tflops"] > 0
        assert ref["speedup"] == pytest.approx(1.0)
        assert ref["samples"] == 3 and ref["calls_per_sample"] >= 1
        assert ref["memory"]["argument_bytes"] > 0
        cpu = by[("cpu", ps)]
        if cpu_built:
            assert cpu["status"] == "ok" and cpu["ms"] > 0
            assert cpu["speedup"] == pytest.approx(ref["ms"] / cpu["ms"])
        else:
            assert cpu["status"] == "skipped" and cpu["note"]
        fused = by[("fused", ps)]
        if runner.has_gpu() and jax_natten.backend_available("fused"):
            assert fused["status"] == "ok" and fused["ms"] > 0
        else:  # no GPU here, or no fused kernels: skipped, with the reason
            assert fused["status"] == "skipped" and fused["ms"] is None
            assert fused["speedup"] is None and "fused" in fused["note"]
        peer = by[("peer:flex", ps)]  # peer results join the table and the ratios
        assert peer["ms"] == (0.5 if ps == "fwd" else 2.0) and peer["device"] == "TestGPU"
        assert peer["speedup"] == pytest.approx(ref["ms"] / peer["ms"])
    for r in records:
        assert r["problem"] == "custom" and r["dtype"] == "bf16" and r["op"] == "attention"
        assert r["jax_version"] == jax.__version__ and r["date"]
        if r["backend"] == "cpu" and r["status"] == "ok":
            assert r["device"].startswith("cpu")
    # fwd+bwd FLOPs count 3.5x forward; forward = 4*B*H*N*prod(k)*D
    fwd_flops = 4 * 1 * 2 * 120 * 15 * 8
    assert by[("reference", "fwd")]["flops"] == fwd_flops
    assert by[("reference", "fwdbwd")]["flops"] == 3.5 * fwd_flops

    # The table: a header, one row per cell, the skip explained in a footnote.
    assert "B1 H2 12x10 D8 k3x5" in text
    for word in ("problem", "backend", "TFLOP/s", "vs reference", "temp MiB", "peer:flex"):
        assert word in text
    rows = [l for l in text.splitlines() if l.startswith("custom ")]
    assert len(rows) == 8
    fused_rows = [l for l in rows if " fused " in l]
    assert len(fused_rows) == 2
    if by[("fused", "fwd")]["status"] == "skipped":
        assert all("skipped" in l and "[" in l for l in fused_rows)
        assert any(l.startswith("[") and "fused" in l for l in text.splitlines())
    assert any(" reference " in l and "1.00x" in l for l in rows)
    # The backward alone (fwd+bwd - fwd) of every backend that measured both passes.
    bwd_rows = {l.split()[1]: l.split() for l in text.splitlines()
                if l.startswith("  custom ") and len(l.split()) == 6}
    assert bwd_rows["peer:flex"][3:5] == ["1.500", "3.00"]  # 2.0 - 0.5 ms; 1.5 / 0.5
    ref_bwd = by[("reference", "fwdbwd")]["ms"] - by[("reference", "fwd")]["ms"]
    assert float(bwd_rows["reference"][3]) == pytest.approx(ref_bwd, abs=1e-3)
    if ref_bwd > 0:  # (timings of a tiny problem: the backward could in principle vanish)
        assert bwd_rows["reference"][5] == "1.00x"
        assert bwd_rows["peer:flex"][5] == f"{ref_bwd / 1.5:.2f}x"


def test_cli_list(capsys):
    assert cli.main(["--list"]) == 0
    text = capsys.readouterr().out
    for name in ("nat-2d-small", "2d-large", "2d-dilated", "1d-long", "1d-causal", "3d-video",
                 "1d-4k-f32", "2d-64-dil2", "3d-small", "2d-gqa", "2d-odd"):
        assert name in text
    assert "shared:" in text and "small:" in text and "GFLOP" in text


def test_cli_does_not_time_output_poisoning(capsys, monkeypatch):
    # The tests poison outputs (conftest.py); the benchmark drops that setting before any kernel
    # runs, else the fills would be timed with the kernels. (monkeypatch restores it afterwards.)
    monkeypatch.setenv("JAX_NATTEN_POISON_OUTPUTS", "1")
    assert cli.main(["--list"]) == 0
    assert "JAX_NATTEN_POISON_OUTPUTS" not in os.environ
    assert "output poisoning is not timed" in capsys.readouterr().err


def test_cli_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:  # kernel larger than the axis: jax_natten's own check
        cli.main(["--spatial", "4", "--kernel", "7", "--quiet"])
    assert e.value.code == 2 and "kernel_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--backends", "warp"])
    for bad in ("fused/tensor", "gemm/wgmma"):  # MMA families pin the fused backend only
        with pytest.raises(SystemExit):
            cli.main(["--backends", bad])
    with pytest.raises(SystemExit):
        cli.main(["--problems", "no-such-problem"])
    with pytest.raises(SystemExit):
        cli.main(["--dtype", "f8"])


def test_cli_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as e:
        cli.main(TINY + ["--backends", "reference", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'pip install "jax-natten[plot]"' in err


def test_cli_help_refers_only_to_the_repository():
    """The help names no folder outside the package and offers the `plot` extra, which exists."""
    import pathlib
    import re
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = cli.build_parser().format_help()
    assert not re.search(r"shared/|peers_\w+\.py|SPEC", text), text
    assert '"jax-natten[plot]"' in text
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("tests run outside the repository")
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert extras["plot"] == ["matplotlib"]
    assert "plot" in extras["dev"][0] and "test" in extras["dev"][0]


def test_backend_names_pin_mma_families():
    assert runner.split_backend("fused/mma_sync") == ("fused", "mma_sync")
    assert runner.split_backend("gemm") == ("gemm", "")
    assert runner.known_backend("fused/deterministic") and not runner.known_backend("gemm/wgmma")
    assert all(runner.known_backend(b) for b in ("fused", "fused/wgmma", "fused/auto", "cpu"))
    assert not any(runner.known_backend(b) for b in ("fused/x", "gemm/mma_sync", "warp"))


def test_builtin_problems_are_valid():
    """Every built-in problem passes jax_natten's checks (shapes only, nothing runs)."""
    for p in problems.PROBLEMS:
        # the reference backend builds index tables at trace time: too slow for the large ones
        backend = "cpu" if jax_natten.backend_available("cpu") else "reference"
        if backend == "reference" and p.group == "shared":
            continue
        for op in runner.OPS:
            f = runner.function(p, op, backend, "fwdbwd")
            jax.eval_shape(f, *[jax.ShapeDtypeStruct(s, jnp.float32)
                                for s in runner.arg_shapes(p, op, "fwdbwd")])
    shared = [p.name for p in problems.select("shared")]
    assert shared == ["nat-2d-small", "2d-large", "2d-dilated", "1d-long", "1d-causal",
                      "3d-video"]
    assert problems.BY_NAME["nat-2d-small"].useful_flops() == 4 * 64 * 4 * 56 * 56 * 49 * 32


def test_cell_oom_predicted_and_over_budget(monkeypatch):
    p = problems.Problem("t", 1, 2, (12, 10), 8, 3)
    cache = runner.InputCache()
    monkeypatch.setattr(runner, "free_bytes", lambda dev: 1000)
    rec = runner.run_cell(p, "f32", "attention", "fwd", "reference", runner.Options(), cache)
    assert rec["status"] == "oom" and "GiB" in rec["note"] and rec["ms"] is None
    monkeypatch.undo()
    opts = runner.Options(max_seconds=1e-9)
    rec = runner.run_cell(p, "f32", "attention", "fwd", "reference", opts, cache)
    assert rec["status"] == "estimate" and rec["ms"] > 0 and "one run" in rec["note"]
    report.add_speedups([rec], "reference")
    assert "~" in report.table([rec])


def test_timing_plan_and_device_events():
    # fast calls are batched into ~sample_ms samples; slow ones are cut to the budget
    assert timing.plan(1e-4, iters=30, warmup=3, max_seconds=60, sample_ms=20,
                       max_calls_per_sample=200) == (200, 3, 30, "")
    assert timing.plan(2.0, iters=30, warmup=3, max_seconds=60, sample_ms=20,
                       max_calls_per_sample=200)[:3] == (1, 0, 30)
    cps, warm, n, note = timing.plan(1.0, iters=30, warmup=3, max_seconds=10, sample_ms=20,
                                     max_calls_per_sample=200)
    assert (cps, warm, n) == (1, 0, 10) and "max-seconds" in note
    # device spans come from the "XLA Modules" line of the GPU plane
    data = jax.profiler.ProfileData.from_text_proto("""
      planes { id: 1 name: "/device:GPU:0"
        lines { id: 1 name: "XLA Modules"
          events { metadata_id: 1 offset_ps: 0 duration_ps: 2000000000 }
          events { metadata_id: 1 offset_ps: 3000000000 duration_ps: 1000000000 }
          events { metadata_id: 2 offset_ps: 5000000000 duration_ps: 7000000000 } }
        lines { id: 2 name: "XLA Ops" events { metadata_id: 1 duration_ps: 5 } }
        event_metadata { key: 1 value { id: 1 name: "jit_fwdbwd(1)" } }
        event_metadata { key: 2 value { id: 2 name: "jit_other(2)" } } }
      planes { id: 2 name: "/host:CPU" }""")
    assert timing.module_durations(data) == pytest.approx([2e-3, 1e-3, 7e-3])
    assert timing.module_durations(data, "jit_fwdbwd") == pytest.approx([2e-3, 1e-3])
    # traces with kernels only (on "Stream #N" lines): their busy time
    kernels_only = jax.profiler.ProfileData.from_text_proto("""
      planes { id: 1 name: "/device:GPU:0"
        lines { id: 1 name: "Stream #14(Compute)"
          events { metadata_id: 1 offset_ps: 0 duration_ps: 2000000000 }
          events { metadata_id: 1 offset_ps: 3000000000 duration_ps: 1000000000 } }
        event_metadata { key: 1 value { id: 1 name: "natten_kernel" } } }
      planes { id: 2 name: "/host:CPU" lines { id: 1 name: "Stream #1" events {
        metadata_id: 1 duration_ps: 9000000000 } } }""")
    assert timing.module_durations(kernels_only) == []
    assert timing.kernel_busy_seconds(kernels_only) == pytest.approx(3e-3)
