// Torch binding: shape/dtype checks, output and workspace allocation (caching allocator), the
// current stream, and dispatch to the plain-pointer launchers in the .cu objects. No CUDA kernel
// lives here. Semantics of every op: kernels/_cuda.py and kernels/csrc/launchers.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "launchers.h"

#ifndef UPCLIP_WITH_FP16  // build.py sets both; --reduced builds bf16 only
#define UPCLIP_WITH_FP16 1
#endif
#ifndef UPCLIP_WITH_SM80
#define UPCLIP_WITH_SM80 1
#endif

namespace upclip {
namespace {

enum class Arch { sm90, sm80 };

void check_status(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "kernels.", op, " failed: ", error);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

DType dtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return DType::bf16;
  TORCH_CHECK(t.scalar_type() == at::kHalf, "kernels: expected bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(UPCLIP_WITH_FP16, "kernels: this build has no float16 kernels (built with "
              "--reduced); rebuild with `python -m kernels.build`");
  return DType::fp16;
}

Arch arch_of(int device) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major == 9 && minor == 0) return Arch::sm90;
  TORCH_CHECK(UPCLIP_WITH_SM80 && major == 8, "kernels: no grouped GEMM kernel for compute "
              "capability ", major, ".", minor, " (this build has sm_90a",
              UPCLIP_WITH_SM80 ? " and sm_80/8.x" : "", ")");
  return Arch::sm80;
}

bool supports_device(int64_t device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, int(device)) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, int(device)) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return (major == 9 && minor == 0) || (UPCLIP_WITH_SM80 && major == 8);
}

template <Mode M, DType D>
size_t workspace_bytes(Arch arch, int groups, int device) {
#if UPCLIP_WITH_SM80
  if (arch == Arch::sm80) return sm80_grouped_gemm_workspace<D, M>(groups, device);
#endif
  return sm90_grouped_gemm_workspace<D, M>(groups, device);
}

template <Mode M, DType D>
const char* launch(Arch arch, const GroupedGemmArgs& args) {
#if UPCLIP_WITH_SM80
  if (arch == Arch::sm80) return sm80_grouped_gemm<D, M>(args);
#endif
  return sm90_grouped_gemm<D, M>(args);
}

template <Mode M, DType D>
void run_typed(Arch arch, GroupedGemmArgs& args, const at::Tensor& like) {
  args.workspace_bytes = workspace_bytes<M, D>(arch, args.num_groups, args.device);
  at::Tensor workspace = at::empty({int64_t(args.workspace_bytes)}, like.options().dtype(at::kByte));
  args.workspace = workspace.data_ptr();
  check_status(launch<M, D>(arch, args), "grouped_gemm");
}

template <Mode M>
void run_gemm(GroupedGemmArgs& args, DType dtype, const at::Tensor& like) {
  const Arch arch = arch_of(args.device);
#if UPCLIP_WITH_FP16
  if (dtype == DType::fp16) return run_typed<M, DType::fp16>(arch, args, like);
#endif
  run_typed<M, DType::bf16>(arch, args, like);
}

void check_cuda(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "kernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "kernels: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, "kernels: ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_layout(const at::Tensor& layout, const at::Tensor& x) {
  check_cuda(layout, "layout", 2);
  TORCH_CHECK(layout.scalar_type() == at::kInt && layout.size(0) == 2,
              "kernels: layout must be int32 [2, groups], got ", layout.scalar_type(), " ",
              layout.sizes());
  TORCH_CHECK(layout.get_device() == x.get_device(), "kernels: layout and data on different devices");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "kernels: ", an, " is ", a.scalar_type(),
              " but ", bn, " is ", b.scalar_type());
  TORCH_CHECK(a.get_device() == b.get_device(), "kernels: ", an, " and ", bn,
              " are on different devices");
}

void check_multiple_of_8(int64_t v, const char* what) {
  TORCH_CHECK(v % 8 == 0, "kernels: ", what, " = ", v, " must be a multiple of 8");
}

GroupedGemmArgs make_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& d,
                          const at::Tensor& layout, int64_t experts, int64_t k, int64_t n) {
  GroupedGemmArgs args;
  args.a = a.data_ptr();
  args.b = b.data_ptr();
  args.d = d.data_ptr();
  args.starts = layout[0].data_ptr<int32_t>();
  args.rows = layout[1].data_ptr<int32_t>();
  args.num_groups = int(layout.size(1));
  args.num_experts = int(experts);
  args.k = k;
  args.n = n;
  args.device = a.get_device();
  args.stream = current_stream();
  return args;
}

// ---- ops -------------------------------------------------------------------------------------

at::Tensor group_layout_op(const at::Tensor& counts, int64_t total_rows, int64_t stride) {
  check_cuda(counts, "counts", 1);
  TORCH_CHECK(counts.scalar_type() == at::kInt, "kernels: counts must be int32");
  c10::cuda::CUDAGuard guard(counts.device());
  at::Tensor layout = at::empty({2, counts.size(0)}, counts.options());
  check_status(group_layout(counts.data_ptr<int32_t>(), int(counts.size(0)), total_rows, stride,
                            layout[0].data_ptr<int32_t>(), layout[1].data_ptr<int32_t>(),
                            current_stream()),
               "group_layout");
  return layout;
}

// y[T, N] = x[T, K] @ w[g % E] on covered rows; uncovered rows are left unwritten.
at::Tensor gmm_fprop(const at::Tensor& x, const at::Tensor& w, const at::Tensor& layout) {
  check_cuda(x, "x", 2);
  check_cuda(w, "w", 3);
  check_layout(layout, x);
  check_same(x, w, "x", "w");
  TORCH_CHECK(x.size(1) == w.size(1), "kernels: x is ", x.sizes(), " but w is ", w.sizes());
  TORCH_CHECK(layout.size(1) % w.size(0) == 0, "kernels: ", layout.size(1),
              " groups is not a multiple of ", w.size(0), " experts");
  check_multiple_of_8(w.size(1), "K");
  check_multiple_of_8(w.size(2), "N");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), w.size(2)}, x.options());
  GroupedGemmArgs args = make_args(x, w, y, layout, w.size(0), w.size(1), w.size(2));
  run_gemm<Mode::fprop>(args, dtype_of(x), x);
  return y;
}

// dx[T, K] = dy[T, N] @ w[g % E]^T on covered rows; uncovered rows are left unwritten.
at::Tensor gmm_dgrad(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& layout) {
  check_cuda(dy, "dy", 2);
  check_cuda(w, "w", 3);
  check_layout(layout, dy);
  check_same(dy, w, "dy", "w");
  TORCH_CHECK(dy.size(1) == w.size(2), "kernels: dy is ", dy.sizes(), " but w is ", w.sizes());
  TORCH_CHECK(layout.size(1) % w.size(0) == 0, "kernels: ", layout.size(1),
              " groups is not a multiple of ", w.size(0), " experts");
  check_multiple_of_8(w.size(1), "K");
  check_multiple_of_8(w.size(2), "N");
  c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dx = at::empty({dy.size(0), w.size(1)}, dy.options());
  GroupedGemmArgs args = make_args(dy, w, dx, layout, w.size(0), w.size(1), w.size(2));
  run_gemm<Mode::dgrad>(args, dtype_of(dy), dy);
  return dx;
}

// dw[G, K, N] = x[rows_g]^T @ dy[rows_g], one slab per group; empty groups get zeros.
at::Tensor gmm_wgrad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& layout) {
  check_cuda(x, "x", 2);
  check_cuda(dy, "dy", 2);
  check_layout(layout, x);
  check_same(x, dy, "x", "dy");
  TORCH_CHECK(x.size(0) == dy.size(0), "kernels: x is ", x.sizes(), " but dy is ", dy.sizes());
  check_multiple_of_8(x.size(1), "K");
  check_multiple_of_8(dy.size(1), "N");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t groups = layout.size(1);
  at::Tensor dw = at::empty({groups, x.size(1), dy.size(1)}, x.options());
  GroupedGemmArgs args = make_args(x, dy, dw, layout, groups, x.size(1), dy.size(1));
  run_gemm<Mode::wgrad>(args, dtype_of(x), x);
  check_status(zero_empty_groups(dtype_of(x), dw.data_ptr(), args.rows, int(groups),
                                 x.size(1) * dy.size(1), args.stream),
               "zero_empty_groups");
  return dw;
}

// In place: h <- h + bias[g % E] on covered rows, 0 elsewhere. Returns act(h) (same zeros) when
// act != none, else an undefined tensor.
std::optional<at::Tensor> bias_act_op(at::Tensor h, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& layout, int64_t act) {
  check_cuda(h, "h", 2);
  check_layout(layout, h);
  check_multiple_of_8(h.size(1), "N");
  TORCH_CHECK(act >= 0 && act <= 2, "kernels: unknown activation id ", act);
  c10::cuda::CUDAGuard guard(h.device());
  const int groups = int(layout.size(1));
  const DType dtype = dtype_of(h);
  const int32_t* starts = layout[0].data_ptr<int32_t>();
  const int32_t* rows = layout[1].data_ptr<int32_t>();
  if (!bias && act == 0) {
    check_status(zero_uncovered_rows(dtype, h.data_ptr(), starts, rows, groups, h.size(0),
                                     h.size(1), current_stream()),
                 "zero_uncovered_rows");
    return std::nullopt;
  }
  int64_t experts = groups;
  if (bias) {
    check_cuda(*bias, "bias", 2);
    check_same(h, *bias, "h", "bias");
    experts = bias->size(0);
    TORCH_CHECK(bias->size(1) == h.size(1) && experts > 0 && groups % experts == 0,
                "kernels: bias ", bias->sizes(), " does not fit h ", h.sizes(), " with ", groups,
                " groups");
  }
  std::optional<at::Tensor> out;
  if (act != 0) out = at::empty_like(h);
  check_status(bias_act_forward(dtype, h.data_ptr(), out ? out->data_ptr() : nullptr,
                                bias ? bias->data_ptr() : nullptr, static_cast<Act>(act), starts,
                                rows, groups, int(experts), h.size(0), h.size(1), current_stream()),
               "bias_act");
  return out;
}

// In place: grad <- grad * act'(h) on covered rows, 0 elsewhere. Returns act(h) recomputed.
at::Tensor act_backward_op(at::Tensor grad, const at::Tensor& h, const at::Tensor& layout,
                           int64_t act) {
  check_cuda(grad, "grad", 2);
  check_cuda(h, "h", 2);
  check_layout(layout, h);
  check_same(grad, h, "grad", "h");
  TORCH_CHECK(grad.sizes() == h.sizes(), "kernels: grad ", grad.sizes(), " vs h ", h.sizes());
  check_multiple_of_8(h.size(1), "N");
  TORCH_CHECK(act >= 0 && act <= 2, "kernels: unknown activation id ", act);
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty_like(h);
  check_status(act_backward(dtype_of(h), grad.data_ptr(), h.data_ptr(), out.data_ptr(),
                            static_cast<Act>(act), layout[0].data_ptr<int32_t>(),
                            layout[1].data_ptr<int32_t>(), int(layout.size(1)), h.size(0),
                            h.size(1), current_stream()),
               "act_backward");
  return out;
}

// [G, N] fp32 column sums of x over each group's rows (the bias gradient).
at::Tensor group_row_sum_op(const at::Tensor& x, const at::Tensor& layout) {
  check_cuda(x, "x", 2);
  check_layout(layout, x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({layout.size(1), x.size(1)}, x.options().dtype(at::kFloat));
  check_status(group_row_sum(dtype_of(x), x.data_ptr(), out.data_ptr<float>(),
                             layout[0].data_ptr<int32_t>(), layout[1].data_ptr<int32_t>(),
                             int(layout.size(1)), x.size(0), x.size(1), current_stream()),
               "group_row_sum");
  return out;
}

void zero_uncovered_rows_op(at::Tensor x, const at::Tensor& layout) {
  check_cuda(x, "x", 2);
  check_layout(layout, x);
  check_multiple_of_8(x.size(1), "N");
  c10::cuda::CUDAGuard guard(x.device());
  check_status(zero_uncovered_rows(dtype_of(x), x.data_ptr(), layout[0].data_ptr<int32_t>(),
                                   layout[1].data_ptr<int32_t>(), int(layout.size(1)), x.size(0),
                                   x.size(1), current_stream()),
               "zero_uncovered_rows");
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["archs"] = UPCLIP_WITH_SM80 ? std::vector<std::string>{"sm_90a", "sm_80"}
                                   : std::vector<std::string>{"sm_90a"};
  info["dtypes"] = UPCLIP_WITH_FP16 ? std::vector<std::string>{"bfloat16", "float16"}
                                    : std::vector<std::string>{"bfloat16"};
  return info;
}

}  // namespace
}  // namespace upclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "UpCLIP grouped GEMM kernels (CUTLASS); use the kernels package, not this module";
  m.def("group_layout", &upclip::group_layout_op);
  m.def("gmm_fprop", &upclip::gmm_fprop);
  m.def("gmm_dgrad", &upclip::gmm_dgrad);
  m.def("gmm_wgrad", &upclip::gmm_wgrad);
  m.def("bias_act", &upclip::bias_act_op);
  m.def("act_backward", &upclip::act_backward_op);
  m.def("group_row_sum", &upclip::group_row_sum_op);
  m.def("zero_uncovered_rows", &upclip::zero_uncovered_rows_op);
  m.def("supports_device", &upclip::supports_device);
  m.def("build_info", &upclip::build_info);
}
