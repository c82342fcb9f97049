// Plain-pointer interface between the CUDA objects (no torch headers) and the torch binding.
//
// Row groups. A 2-D activation [T, *] is split into G row groups; group g covers rows
// [starts[g], starts[g] + rows[g]) and multiplies expert weight g % E. `starts`/`rows` are int32
// device arrays written by group_layout() from the user's counts, so nothing here reads them on
// the host. Rows covered by no group (capacity padding) are never touched by a GEMM.
//
// Weights are [E, K, N] ("x @ w[e]", row-major). The three GEMMs of one grouped linear layer:
//   fprop: d[rows_g, N]  = a[rows_g, K] @ b[e]          a = x,  b = w,  d = y
//   dgrad: d[rows_g, K]  = a[rows_g, N] @ b[e]^T        a = dy, b = w,  d = dx
//   wgrad: d[g][K, N]    = a[rows_g, K]^T @ b[rows_g, N] a = x, b = dy, d = dw (one slab per GROUP,
//                                                        so G slabs; empty groups are zero-filled)
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace upclip {

enum class DType : int { bf16 = 0, fp16 = 1 };
enum class Mode : int { fprop = 0, dgrad = 1, wgrad = 2 };
enum class Act : int { none = 0, gelu = 1, quick_gelu = 2 };

struct GroupedGemmArgs {
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const int32_t* starts = nullptr;  // [G] device
  const int32_t* rows = nullptr;    // [G] device
  int num_groups = 0;               // G
  int num_experts = 0;              // E (G % E == 0)
  int64_t k = 0;                    // K: weight rows (layer input features)
  int64_t n = 0;                    // N: weight cols (layer output features)
  void* workspace = nullptr;        // device bytes, size from *_workspace()
  size_t workspace_bytes = 0;
  int device = 0;
  cudaStream_t stream = nullptr;
};

// Each returns nullptr on success, otherwise a static message. Definitions are explicit
// instantiations in sm90_grouped_gemm.cu / sm80_grouped_gemm.cu, one object per (dtype, mode).
template <DType D, Mode M>
size_t sm90_grouped_gemm_workspace(int num_groups, int device);
template <DType D, Mode M>
const char* sm90_grouped_gemm(const GroupedGemmArgs& args);
template <DType D, Mode M>
size_t sm80_grouped_gemm_workspace(int num_groups, int device);
template <DType D, Mode M>
const char* sm80_grouped_gemm(const GroupedGemmArgs& args);

// elementwise.cu. T = total rows, N = columns; all tensors row-major and contiguous.
// starts/rows <- counts (int32 [G]); stride > 0: group g starts at g * stride and holds
// min(counts[g], stride) rows; stride == 0: groups are consecutive from row 0. Counts are clamped
// to [0, rows left] so a bad count can never address outside the tensor.
const char* group_layout(const int32_t* counts, int num_groups, int64_t total_rows, int64_t stride,
                         int32_t* starts, int32_t* rows, cudaStream_t stream);
// h[T, N] (GEMM output, in place) <- h + bias[g % E] on covered rows, 0 on uncovered rows;
// act_out (optional) <- act(h) likewise. bias may be null.
const char* bias_act_forward(DType dtype, void* h, void* act_out, const void* bias, Act act,
                             const int32_t* starts, const int32_t* rows, int num_groups,
                             int num_experts, int64_t total_rows, int64_t n, cudaStream_t stream);
// grad[T, N] (dL/d act(h), in place) <- grad * act'(h) on covered rows, 0 elsewhere;
// act_out (optional) <- act(h) (recomputed for the fc2 weight gradient).
const char* act_backward(DType dtype, void* grad, const void* h, void* act_out, Act act,
                         const int32_t* starts, const int32_t* rows, int num_groups,
                         int64_t total_rows, int64_t n, cudaStream_t stream);
// out[G, N] (fp32, zeroed by the caller) += column sums of x over each group's rows.
const char* group_row_sum(DType dtype, const void* x, float* out, const int32_t* starts,
                          const int32_t* rows, int num_groups, int64_t total_rows, int64_t n,
                          cudaStream_t stream);
// x[T, N]: zero the rows no group covers (covered rows are not read or written).
const char* zero_uncovered_rows(DType dtype, void* x, const int32_t* starts, const int32_t* rows,
                                int num_groups, int64_t total_rows, int64_t n, cudaStream_t stream);
// w[G, slab]: zero the slabs of groups with rows[g] == 0 (the wgrad GEMM skips them).
const char* zero_empty_groups(DType dtype, void* w, const int32_t* rows, int num_groups,
                              int64_t slab, cudaStream_t stream);

}  // namespace upclip
