"""One description of the FFI ops' buffers (`jax_natten/backends/ffi.py`): cuda/README.md documents
it, the C++ handlers bind the same buffers, module.cc registers the same targets, and the limits
Python checks are the extension's."""
import pathlib
import re
import types

import pytest

from jax_natten import config
from jax_natten.backends import ffi, fna

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "cuda" / "README.md"


def _table_rows(text: str, header: str):
    """The rows (lists of cells) of the Markdown table whose header starts with `header`."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _names(cell: str) -> list:
    return [n.strip().strip("`") for n in cell.split(",") if n.strip()]


def _sources_present():
    if not README.exists():
        pytest.skip("not run from a source tree")


def test_readme_op_table_matches_the_descriptions():
    _sources_present()
    rows = {r[0].strip("`"): r for r in _table_rows(README.read_text(), "| op | targets |")}
    assert set(rows) == {op.name for op in ffi.OPS}

    def per_backend(cell):
        """`names; backend: names; ...` -> (the leading names, {backend: names})."""
        common, documented = [], {}
        for part in filter(None, (p.strip() for p in cell.split(";"))):
            if ":" in part:
                backend, names = part.split(":")
                documented[backend.strip("` ")] = _names(names)
            else:
                common = _names(part)
        return common, documented

    for op in ffi.OPS:
        _, targets, operands, results, residuals, workspaces = rows[op.name]
        assert _names(targets) == list(op.targets.values()), op.name
        common, own = per_backend(operands)
        assert common == [b.name for b in op.operands], op.name
        assert own == {b: [x.name for x in bufs] for b, bufs in op.backend_operands.items()}
        assert _names(results) == [b.name for b in op.results], op.name
        for cell, described in ((residuals, op.residuals), (workspaces, op.workspaces)):
            assert per_backend(cell) == ([], {b: [w.name for w in ws]
                                              for b, ws in described.items()}), op.name


def test_readme_layout_labels_match_the_descriptions():
    _sources_present()
    labels = {}
    for row in _table_rows(README.read_text(), "| buffer | shape | dim labels |"):
        labels[row[0].split()[0]] = tuple(row[2].strip("`").split())
    for op in ffi.OPS:
        for backend in op.targets:
            for buf in op.operands_of(backend) + op.results_of(backend):
                # A gradient (dq, do, dlse, ...) has the labels of its primal.
                name = buf.name if buf.name in labels else buf.name[1:]
                assert labels.get(name) == buf.dims, (op.name, buf.name)


def _handler_bindings() -> dict:
    """Handler symbol -> (operands, results) bound, read from the C++ sources."""
    pattern = re.compile(r"XLA_FFI_DEFINE_HANDLER_SYMBOL\(\s*(\w+),\s*[\w:]+,\s*\(?\s*"
                         r"(?:NATTEN_\w+_BIND\(|natten::bind_handler<)(\d+),\s*(\d+)")
    found = {}
    for path in (ROOT / "cuda").rglob("*"):
        if path.suffix in (".cc", ".cu"):
            for symbol, args, rets in pattern.findall(path.read_text()):
                found[symbol] = (int(args), int(rets))
    return found


def test_handlers_bind_the_described_buffers():
    _sources_present()
    entries = dict(re.findall(r'\{"(natten_\w+)", "(?:cpu|CUDA)", (\w+)\}',
                              (ROOT / "cuda" / "module.cc").read_text()))
    bindings = _handler_bindings()
    described = {}
    for op in ffi.OPS:
        for backend, target in op.targets.items():
            described[target] = (len(op.operands_of(backend)), len(op.results_of(backend)))
    assert set(entries) == set(described)
    for target, symbol in entries.items():
        assert bindings.get(symbol) == described[target], (target, symbol)


def test_registered_targets_are_described():
    registered = set(ffi._REGISTERED)
    assert registered, "the extension registered no targets"
    assert registered <= {t for op in ffi.OPS for t in op.targets.values()}


def test_limits_come_from_the_extension():
    assert ffi.LIMITS is not None
    assert tuple(ffi.LIMITS["mma_codes"]) == config.MMA_FAMILIES
    assert ffi.LIMITS["mma_codes"] == {"auto": 0, "mma_sync": 1, "wgmma": 2}
    assert config.max_tile_tokens("q_tile") == ffi.LIMITS["fused_max_q_tile_tokens"] == 128
    assert config.max_tile_tokens("kv_tile") == ffi.LIMITS["fused_max_kv_tile_tokens"] == 64
    assert ffi.LIMITS["fused_max_head_dim"] == 128 and ffi.LIMITS["fused_max_heads"] == 65535
    assert ffi.LIMITS["gemm_head_dim_multiple"] == ffi.LIMITS["fused_head_dim_multiple"] == 8
    assert ffi.LIMITS["fused_max_tokens"] == 2**31 - 1


@pytest.mark.parametrize("spatial, heads, message", [
    ((1,), 65536, "at most 65535 heads"),
    ((2**16, 2**15), 1, "fewer than 2\\*\\*31 tokens"),
])
def test_fused_size_limits(spatial, heads, message):
    # Shapes only (nothing is allocated): the checks the op runs before any kernel.
    problem = types.SimpleNamespace(spatial=spatial, heads=heads)
    with pytest.raises(ValueError, match=message):
        fna.check_size("fused", problem)
    fna.check_size("gemm", problem)  # the limits are the fused kernels'
    fna.check_size("fused", types.SimpleNamespace(spatial=(2**15, 2**15, 1), heads=65535))
