// CUDA FFI handler symbols (platform "CUDA"), defined in cuda/naive/*.cu, cuda/gemm/handlers.cu and
// cuda/fna/handlers.cu, registered by cuda/module.cc. Their buffers are described in
// cuda/README.md (and jax_natten/backends/ffi.py).
// Plain C++: includable from host-only translation units.
#pragma once

#include "xla/ffi/api/ffi.h"

// qk_fwd: q, k, rpb, add_k -> w.        qk_bwd: q, k, add_k, dw -> dq, dk, drpb, dadd_k.
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenNaiveQkFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenNaiveQkBwd);
// av_fwd: w, v, add_v -> o.             av_bwd: w, v, add_v, do -> dw, dv, dadd_v.
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenNaiveAvFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenNaiveAvBwd);

// The same four ops on the GEMM-based kernels (cuda/gemm/), same buffers and attributes.
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenGemmQkFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenGemmQkBwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenGemmAvFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenGemmAvBwd);

// Fused attention (cuda/fna/): fna_fwd: q, k, v, rpb, add_k, add_v -> o, lse; fna_bwd: + o, lse,
// do, dlse -> dq, dk, dv, drpb, dadd_k, dadd_v, then the workspaces delta and dq_acc. Extra
// attributes: scale, q_tile, kv_tile, mma (and deterministic for the backward).
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenFusedFnaFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenFusedFnaBwd);
