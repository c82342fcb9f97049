// Ampere (sm_80) grouped GEMM: CUTLASS 2.x GemmGrouped, cp.async multistage mainloop, fp32
// accumulation. GroupScheduleMode::kDeviceOnly: the kernel's problem visitor reads the problem
// sizes on the device (no host precompute, no sync); a group with m == 0 owns no tiles.
//
// build.py compiles this file once per dtype (-DUPCLIP_DTYPE=<DType>, see launchers.h): one
// object holds the fprop, dgrad and wgrad kernels of that dtype, built for -gencode=arch=compute_80,code=sm_80.
#include "grouped_common.cuh"
#include "launchers.h"

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#if !defined(UPCLIP_DTYPE)
#error "compile with -DUPCLIP_DTYPE=<0|1> (kernels/build.py does)"
#endif

namespace upclip {
namespace {

template <DType D> struct CutlassType;
template <> struct CutlassType<DType::bf16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassType<DType::fp16> { using type = cutlass::half_t; };

template <Mode M> struct OperandLayouts;
template <> struct OperandLayouts<Mode::fprop> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
};
template <> struct OperandLayouts<Mode::dgrad> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
};
template <> struct OperandLayouts<Mode::wgrad> {
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
};

template <DType D, Mode M>
struct Sm80Gemm {
  using Element = typename CutlassType<D>::type;
  static constexpr int kAlignment = 8;  // 16-byte cp.async
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, typename OperandLayouts<M>::A, cutlass::ComplexTransform::kNone, kAlignment,
      Element, typename OperandLayouts<M>::B, cutlass::ComplexTransform::kNone, kAlignment,
      Element, cutlass::layout::RowMajor, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

struct ArgArrays {
  cutlass::gemm::GemmCoord* shapes;
  void** ptr_a;
  void** ptr_b;
  void** ptr_d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldd;
  size_t bytes;

  ArgArrays(void* base, int groups) {
    size_t off = 0;
    auto carve = [&](size_t each) {
      void* p = static_cast<char*>(base) + off;
      off = align_up(off + each * size_t(groups), 256);
      return p;
    };
    shapes = static_cast<cutlass::gemm::GemmCoord*>(carve(sizeof(cutlass::gemm::GemmCoord)));
    ptr_a = static_cast<void**>(carve(sizeof(void*)));
    ptr_b = static_cast<void**>(carve(sizeof(void*)));
    ptr_d = static_cast<void**>(carve(sizeof(void*)));
    lda = static_cast<int64_t*>(carve(sizeof(int64_t)));
    ldb = static_cast<int64_t*>(carve(sizeof(int64_t)));
    ldd = static_cast<int64_t*>(carve(sizeof(int64_t)));
    bytes = off;
  }
};

template <Mode M>
__global__ void build_args(GroupedGemmArgs args, ArgArrays out) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= args.num_groups) return;
  const GroupOperands o = group_operands<M>(args, g);
  out.shapes[g] = cutlass::gemm::GemmCoord(o.m, o.n, o.k);
  out.ptr_a[g] = const_cast<uint16_t*>(static_cast<const uint16_t*>(args.a) + o.off_a);
  out.ptr_b[g] = const_cast<uint16_t*>(static_cast<const uint16_t*>(args.b) + o.off_b);
  out.ptr_d[g] = static_cast<uint16_t*>(args.d) + o.off_d;
  out.lda[g] = o.lda;
  out.ldb[g] = o.ldb;
  out.ldd[g] = o.ldd;
}

// One persistent wave: occupancy x SMs, computed once per device (host attribute queries only).
template <class Gemm>
int threadblock_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return 0;
  if (cached[device] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cached[device] = Gemm::maximum_active_blocks() * sms;
  }
  return cached[device];
}

}  // namespace

template <DType D, Mode M>
size_t sm80_grouped_gemm_workspace(int num_groups, int) {
  return ArgArrays(nullptr, num_groups).bytes;  // kDeviceOnly needs no CUTLASS workspace
}

template <DType D, Mode M>
const char* sm80_grouped_gemm(const GroupedGemmArgs& args) {
  using G = Sm80Gemm<D, M>;
  using Element = typename G::Element;
  if (args.num_groups <= 0) return nullptr;
  if (args.k % G::kAlignment || args.n % G::kAlignment) {
    return "sm80 grouped GEMM needs K and N to be multiples of 8 (16-byte cp.async)";
  }
  ArgArrays arr(args.workspace, args.num_groups);
  if (arr.bytes > args.workspace_bytes) return "sm80 grouped GEMM: workspace too small";
  const int blocks = threadblock_count<typename G::Gemm>(args.device);
  if (blocks <= 0) return "sm80 grouped GEMM: occupancy query failed";

  constexpr int kThreads = 128;
  build_args<M><<<(args.num_groups + kThreads - 1) / kThreads, kThreads, 0, args.stream>>>(args, arr);
  if (cudaGetLastError() != cudaSuccess) return "sm80 grouped GEMM: argument kernel launch failed";

  auto** ptr_a = reinterpret_cast<Element**>(arr.ptr_a);
  auto** ptr_b = reinterpret_cast<Element**>(arr.ptr_b);
  auto** ptr_d = reinterpret_cast<Element**>(arr.ptr_d);
  typename G::Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);  // beta 0: C is never read
  typename G::Gemm::Arguments arguments(arr.shapes, args.num_groups, blocks, epilogue, ptr_a, ptr_b,
                                        ptr_d, ptr_d, arr.lda, arr.ldb, arr.ldd, arr.ldd);
  typename G::Gemm gemm;
  cutlass::Status status = gemm.initialize(arguments, nullptr, args.stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(args.stream);
  return status == cutlass::Status::kSuccess ? nullptr : cutlass::cutlassGetStatusString(status);
}

constexpr DType kDType = static_cast<DType>(UPCLIP_DTYPE);
template size_t sm80_grouped_gemm_workspace<kDType, Mode::fprop>(int, int);
template size_t sm80_grouped_gemm_workspace<kDType, Mode::dgrad>(int, int);
template size_t sm80_grouped_gemm_workspace<kDType, Mode::wgrad>(int, int);
template const char* sm80_grouped_gemm<kDType, Mode::fprop>(const GroupedGemmArgs&);
template const char* sm80_grouped_gemm<kDType, Mode::dgrad>(const GroupedGemmArgs&);
template const char* sm80_grouped_gemm<kDType, Mode::wgrad>(const GroupedGemmArgs&);

}  // namespace upclip
