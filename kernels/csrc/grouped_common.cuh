// Per-group GEMM operands for the three modes (see launchers.h), shared by the sm90 and sm80
// argument builders. Everything is computed on the device from starts/rows: no host sync.
#pragma once

#include <cstdint>

#include "launchers.h"

namespace upclip {

struct GroupOperands {
  int m = 0, n = 0, k = 0;            // GEMM problem; m == 0 means "skip this group"
  int64_t off_a = 0, off_b = 0, off_d = 0;  // element offsets into a, b, d
  int64_t lda = 0, ldb = 0, ldd = 0;  // leading dimensions (all operands are packed)
};

template <Mode M>
__device__ inline GroupOperands group_operands(const GroupedGemmArgs& args, int g) {
  const int64_t s = args.starts[g];
  const int rows = args.rows[g];
  const int64_t e = g % args.num_experts;
  const int64_t K = args.k, N = args.n;
  GroupOperands o;
  if constexpr (M == Mode::fprop) {  // [rows, K] (row-major) @ [K, N] (row-major)
    o.m = rows; o.n = int(N); o.k = int(K);
    o.off_a = s * K; o.off_b = e * K * N; o.off_d = s * N;
    o.lda = K; o.ldb = N; o.ldd = N;
  } else if constexpr (M == Mode::dgrad) {  // [rows, N] (row-major) @ w^T: [N, K] (col-major)
    o.m = rows; o.n = int(K); o.k = int(N);
    o.off_a = s * N; o.off_b = e * K * N; o.off_d = s * K;
    o.lda = N; o.ldb = N; o.ldd = K;
  } else {  // wgrad: x^T: [K, rows] (col-major) @ dy: [rows, N] (row-major); ragged reduction
    o.m = rows > 0 ? int(K) : 0;  // an empty group computes nothing; its slab is zero-filled
    o.n = int(N); o.k = rows;
    o.off_a = s * K; o.off_b = s * N; o.off_d = int64_t(g) * K * N;
    o.lda = K; o.ldb = N; o.ldd = N;
  }
  return o;
}

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

}  // namespace upclip
