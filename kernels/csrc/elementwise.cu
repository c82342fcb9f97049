// Memory-bound kernels around the grouped GEMMs: group layout from counts, bias + activation,
// activation backward, per-group bias gradient, zero fills for padding rows and empty groups.
// No torch headers (see kernels/README.md: compile time). 16-bit values are read and written
// 8 at a time (16 bytes), so the column count N must be a multiple of 8 (the binding checks).
#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace upclip {
namespace {

constexpr int kVec = 8;           // elements per 16-byte access
constexpr int kRowThreads = 128;  // threads per block in the row kernels
constexpr int kMaxGroups = 4096;  // starts + rows of all groups sit in shared memory

template <DType D> struct Scalar;
template <> struct Scalar<DType::bf16> {
  using type = __nv_bfloat16;
  static __device__ float to_float(type v) { return __bfloat162float(v); }
  static __device__ type from_float(float v) { return __float2bfloat16(v); }
};
template <> struct Scalar<DType::fp16> {
  using type = __half;
  static __device__ float to_float(type v) { return __half2float(v); }
  static __device__ type from_float(float v) { return __float2half(v); }
};

template <DType D>
__device__ inline void load8(const void* base, int64_t index, float (&v)[kVec]) {
  using S = Scalar<D>;
  const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const typename S::type*>(base) + index);
  const auto* e = reinterpret_cast<const typename S::type*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = S::to_float(e[i]);
}

template <DType D>
__device__ inline void store8(void* base, int64_t index, const float (&v)[kVec]) {
  using S = Scalar<D>;
  uint4 raw;
  auto* e = reinterpret_cast<typename S::type*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) e[i] = S::from_float(v[i]);
  *reinterpret_cast<uint4*>(static_cast<typename S::type*>(base) + index) = raw;
}

template <DType D>
__device__ inline float round_to(float v) {  // the value a 16-bit store would keep
  return Scalar<D>::to_float(Scalar<D>::from_float(v));
}

__device__ inline void store_zero8(void* base, int64_t index) {  // 16-bit element index
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + index) = make_uint4(0, 0, 0, 0);
}

// GELU: exact (erf) form, as torch.nn.GELU(); QuickGELU: x * sigmoid(1.702 x) (OpenAI CLIP).
__device__ inline float act_forward(Act act, float x) {
  switch (act) {
    case Act::gelu: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case Act::quick_gelu: return x / (1.0f + expf(-1.702f * x));
    default: return x;
  }
}

__device__ inline float act_derivative(Act act, float x) {
  switch (act) {
    case Act::gelu: {
      const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
      return cdf + x * pdf;
    }
    case Act::quick_gelu: {
      const float s = 1.0f / (1.0f + expf(-1.702f * x));
      return s + 1.702f * x * s * (1.0f - s);
    }
    default: return 1.0f;
  }
}

// The row kernels stage starts/rows in shared memory and map a row to its group by binary
// search: the group is the last g with starts[g] <= row (starts never decrease), and the row is
// covered when it lies inside that group's prefix. Returns -1 for an uncovered row.
struct RowGroups {
  const int32_t* starts;
  const int32_t* rows;
  int count;

  __device__ static RowGroups stage(const int32_t* starts, const int32_t* rows, int count) {
    extern __shared__ int32_t smem[];
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      smem[i] = starts[i];
      smem[count + i] = rows[i];
    }
    __syncthreads();
    return RowGroups{smem, smem + count, count};
  }

  __device__ int group_of(int64_t row) const {
    if (count == 0 || row < starts[0]) return -1;
    int lo = 0, hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (starts[mid] <= row) lo = mid; else hi = mid - 1;
    }
    return row - starts[lo] < rows[lo] ? lo : -1;
  }
};

template <DType D>
__global__ void bias_act_forward_kernel(void* h, void* act_out, const void* bias, Act act,
                                        const int32_t* starts, const int32_t* rows, int groups,
                                        int experts, int64_t total_rows, int64_t n) {
  const RowGroups rg = RowGroups::stage(starts, rows, groups);
  for (int64_t r = blockIdx.x; r < total_rows; r += gridDim.x) {
    const int g = rg.group_of(r);
    for (int64_t c = int64_t(threadIdx.x) * kVec; c < n; c += int64_t(blockDim.x) * kVec) {
      const int64_t i = r * n + c;
      if (g < 0) {
        store_zero8(h, i);
        if (act_out) store_zero8(act_out, i);
        continue;
      }
      float v[kVec], b[kVec];
      load8<D>(h, i, v);
      if (bias) {
        load8<D>(bias, int64_t(g % experts) * n + c, b);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] = round_to<D>(v[k] + b[k]);
        store8<D>(h, i, v);
      }
      if (act_out) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] = act_forward(act, v[k]);
        store8<D>(act_out, i, v);
      }
    }
  }
}

template <DType D>
__global__ void act_backward_kernel(void* grad, const void* h, void* act_out, Act act,
                                    const int32_t* starts, const int32_t* rows, int groups,
                                    int64_t total_rows, int64_t n) {
  const RowGroups rg = RowGroups::stage(starts, rows, groups);
  for (int64_t r = blockIdx.x; r < total_rows; r += gridDim.x) {
    const bool covered = rg.group_of(r) >= 0;
    for (int64_t c = int64_t(threadIdx.x) * kVec; c < n; c += int64_t(blockDim.x) * kVec) {
      const int64_t i = r * n + c;
      if (!covered) {
        store_zero8(grad, i);
        if (act_out) store_zero8(act_out, i);
        continue;
      }
      float dy[kVec], x[kVec], y[kVec];
      load8<D>(grad, i, dy);
      load8<D>(h, i, x);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        y[k] = act_forward(act, x[k]);
        dy[k] *= act_derivative(act, x[k]);
      }
      store8<D>(grad, i, dy);
      if (act_out) store8<D>(act_out, i, y);
    }
  }
}

__global__ void zero_uncovered_rows_kernel(void* x, const int32_t* starts, const int32_t* rows,
                                           int groups, int64_t total_rows, int64_t n) {
  const RowGroups rg = RowGroups::stage(starts, rows, groups);
  for (int64_t r = blockIdx.x; r < total_rows; r += gridDim.x) {
    if (rg.group_of(r) >= 0) continue;
    for (int64_t c = int64_t(threadIdx.x) * kVec; c < n; c += int64_t(blockDim.x) * kVec) {
      store_zero8(x, r * n + c);
    }
  }
}

// grid (column blocks, groups, row splits): each thread sums one column over a strided subset
// of its group's rows in fp32, then adds the partial sum atomically.
template <DType D>
__global__ void group_row_sum_kernel(const void* x, float* out, const int32_t* starts,
                                     const int32_t* rows, int64_t n) {
  const int g = blockIdx.y;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int count = rows[g];
  if (c >= n || int(blockIdx.z) >= count) return;
  const auto* p = static_cast<const typename Scalar<D>::type*>(x) + int64_t(starts[g]) * n + c;
  float acc = 0.0f;
  for (int r = blockIdx.z; r < count; r += gridDim.z) acc += Scalar<D>::to_float(p[int64_t(r) * n]);
  atomicAdd(out + int64_t(g) * n + c, acc);
}

__global__ void zero_empty_groups_kernel(void* w, const int32_t* rows, int64_t slab) {
  const int g = blockIdx.y;
  if (rows[g] != 0) return;
  const int64_t base = int64_t(g) * slab;
  for (int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; c < slab;
       c += int64_t(gridDim.x) * blockDim.x * kVec) {
    store_zero8(w, base + c);
  }
}

// One block. Each thread owns a contiguous chunk of groups: chunk sums, a Hillis-Steele scan over
// the chunk sums in shared memory, then exclusive prefixes written chunk by chunk.
constexpr int kLayoutThreads = 256;
__global__ void group_layout_kernel(const int32_t* counts, int groups, int64_t total_rows,
                                    int64_t stride, int32_t* starts, int32_t* rows) {
  __shared__ int64_t scan[kLayoutThreads];
  const int chunk = (groups + kLayoutThreads - 1) / kLayoutThreads;
  const int lo = threadIdx.x * chunk;
  const int hi = min(groups, lo + chunk);
  auto clamped = [&](int g) {
    const int64_t c = max(int64_t(counts[g]), int64_t(0));
    return stride > 0 ? min(c, stride) : c;
  };
  if (stride > 0) {
    for (int g = lo; g < hi; ++g) {
      const int64_t s = min(int64_t(g) * stride, total_rows);
      starts[g] = int32_t(s);
      rows[g] = int32_t(min(clamped(g), total_rows - s));
    }
    return;
  }
  int64_t local = 0;
  for (int g = lo; g < hi; ++g) local += clamped(g);
  scan[threadIdx.x] = local;
  __syncthreads();
  for (int offset = 1; offset < kLayoutThreads; offset *= 2) {
    const int64_t add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  int64_t s = scan[threadIdx.x] - local;  // exclusive prefix of this chunk
  for (int g = lo; g < hi; ++g) {
    const int64_t start = min(s, total_rows);
    starts[g] = int32_t(start);
    rows[g] = int32_t(min(clamped(g), total_rows - start));
    s += clamped(g);
  }
}

int row_grid(int64_t total_rows) {
  return int(total_rows < 16384 ? (total_rows > 0 ? total_rows : 1) : 16384);
}

size_t row_smem(int groups) { return size_t(groups) * 2 * sizeof(int32_t); }

const char* launch_status(const char* what) {
  return cudaGetLastError() == cudaSuccess ? nullptr : what;
}

const char* check_groups(int groups) {
  return groups > kMaxGroups ? "at most 4096 row groups are supported" : nullptr;
}

}  // namespace

const char* group_layout(const int32_t* counts, int num_groups, int64_t total_rows, int64_t stride,
                         int32_t* starts, int32_t* rows, cudaStream_t stream) {
  if (num_groups == 0) return nullptr;
  group_layout_kernel<<<1, kLayoutThreads, 0, stream>>>(counts, num_groups, total_rows, stride,
                                                         starts, rows);
  return launch_status("group_layout launch failed");
}

const char* bias_act_forward(DType dtype, void* h, void* act_out, const void* bias, Act act,
                             const int32_t* starts, const int32_t* rows, int num_groups,
                             int num_experts, int64_t total_rows, int64_t n, cudaStream_t stream) {
  if (const char* e = check_groups(num_groups)) return e;
  if (total_rows == 0 || n == 0) return nullptr;
  auto kernel = dtype == DType::bf16 ? bias_act_forward_kernel<DType::bf16>
                                     : bias_act_forward_kernel<DType::fp16>;
  kernel<<<row_grid(total_rows), kRowThreads, row_smem(num_groups), stream>>>(
      h, act_out, bias, act, starts, rows, num_groups, num_experts, total_rows, n);
  return launch_status("bias_act_forward launch failed");
}

const char* act_backward(DType dtype, void* grad, const void* h, void* act_out, Act act,
                         const int32_t* starts, const int32_t* rows, int num_groups,
                         int64_t total_rows, int64_t n, cudaStream_t stream) {
  if (const char* e = check_groups(num_groups)) return e;
  if (total_rows == 0 || n == 0) return nullptr;
  auto kernel = dtype == DType::bf16 ? act_backward_kernel<DType::bf16>
                                     : act_backward_kernel<DType::fp16>;
  kernel<<<row_grid(total_rows), kRowThreads, row_smem(num_groups), stream>>>(
      grad, h, act_out, act, starts, rows, num_groups, total_rows, n);
  return launch_status("act_backward launch failed");
}

const char* group_row_sum(DType dtype, const void* x, float* out, const int32_t* starts,
                          const int32_t* rows, int num_groups, int64_t total_rows, int64_t n,
                          cudaStream_t stream) {
  if (num_groups == 0 || total_rows == 0 || n == 0) return nullptr;
  constexpr int kThreads = 256;
  // Row splits per group: enough blocks for a balanced layout; a skewed giant group still gets
  // all of them (rows per group are unknown on the host).
  const int64_t per_group = total_rows / num_groups;
  const int splits = int(per_group / 64 < 1 ? 1 : (per_group / 64 > 64 ? 64 : per_group / 64));
  const dim3 grid(unsigned((n + kThreads - 1) / kThreads), unsigned(num_groups), unsigned(splits));
  auto kernel = dtype == DType::bf16 ? group_row_sum_kernel<DType::bf16>
                                     : group_row_sum_kernel<DType::fp16>;
  kernel<<<grid, kThreads, 0, stream>>>(x, out, starts, rows, n);
  return launch_status("group_row_sum launch failed");
}

const char* zero_uncovered_rows(DType, void* x, const int32_t* starts, const int32_t* rows,
                                int num_groups, int64_t total_rows, int64_t n, cudaStream_t stream) {
  if (const char* e = check_groups(num_groups)) return e;
  if (total_rows == 0 || n == 0) return nullptr;
  zero_uncovered_rows_kernel<<<row_grid(total_rows), kRowThreads, row_smem(num_groups), stream>>>(
      x, starts, rows, num_groups, total_rows, n);
  return launch_status("zero_uncovered_rows launch failed");
}

const char* zero_empty_groups(DType, void* w, const int32_t* rows, int num_groups, int64_t slab,
                              cudaStream_t stream) {
  if (num_groups == 0 || slab == 0) return nullptr;
  constexpr int kThreads = 256;
  const int64_t vec_blocks = (slab / kVec + kThreads - 1) / kThreads;
  const dim3 grid(unsigned(vec_blocks < 512 ? vec_blocks : 512), unsigned(num_groups));
  zero_empty_groups_kernel<<<grid, kThreads, 0, stream>>>(w, rows, slab);
  return launch_status("zero_empty_groups launch failed");
}

}  // namespace upclip
