// The host (CPU) FFI handlers, defined in cuda/cpu/; module.cc registers them for platform "cpu".
// Buffers and attributes follow cuda/README.md.
#pragma once

#include "xla/ffi/api/ffi.h"

// fna_fwd: q, k, v, rpb, add_k, add_v -> o, lse.
// fna_bwd: q, k, v, rpb, add_k, add_v, o, lse, do, dlse -> dq, dk, dv, drpb, dadd_k, dadd_v.
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenCpuFnaFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenCpuFnaBwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenCpuQkFwd);   // q, k, rpb, add_k -> w
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenCpuQkBwd);   // q, k, add_k, dw -> dq, dk, drpb, dadd_k
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenCpuAvFwd);   // w, v, add_v -> o
XLA_FFI_DECLARE_HANDLER_SYMBOL(NattenCpuAvBwd);   // w, v, add_v, do -> dw, dv, dadd_v
