// Hopper (sm_90a) grouped GEMM: CUTLASS 3.x ptr-array kernel, TMA loads, warp-specialized
// cooperative wgmma, fp32 accumulation, persistent group tile scheduler (an empty group owns no
// tiles, so it costs nothing). Problem shapes, pointers and strides are written on the device by
// build_args() from starts/rows; the host never sees the group sizes.
//
// build.py compiles this file once per dtype (-DUPCLIP_DTYPE=<DType>, see launchers.h): one
// object holds the fprop, dgrad and wgrad kernels of that dtype, built for -gencode=arch=compute_90a,code=sm_90a only.
#include "grouped_common.cuh"
#include "launchers.h"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#if !defined(UPCLIP_DTYPE)
#error "compile with -DUPCLIP_DTYPE=<0|1> (kernels/build.py does)"
#endif

namespace upclip {
namespace {

using namespace cute;

template <DType D> struct CutlassType;
template <> struct CutlassType<DType::bf16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassType<DType::fp16> { using type = cutlass::half_t; };

template <Mode M> struct OperandLayouts;  // CUTLASS layout tags of A and B (D is always row-major)
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
struct Sm90Gemm {
  using Element = typename CutlassType<D>::type;
  using LayoutA = typename OperandLayouts<M>::A;
  using LayoutB = typename OperandLayouts<M>::B;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16 B for TMA

  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K)

  // D = acc (alpha 1, no source: ElementC = void); bias and activation run afterwards in
  // elementwise.cu because they index the bias by group.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignment, Element, LayoutD*, kAlignment,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlignment, Element, LayoutB*, kAlignment, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// Each packed stride has exactly one dynamic (int64) mode: the leading dimension.
template <class Stride>
__device__ inline Stride leading_dim_stride(int64_t ld) {
  Stride s{};
  if constexpr (is_static<decltype(get<0>(s))>::value) {
    get<1>(s) = ld;
  } else {
    get<0>(s) = ld;
  }
  return s;
}

// Device argument arrays, carved out of the caller's workspace.
template <class G>
struct ArgArrays {
  typename G::Shape3* shapes;
  const typename G::Element** ptr_a;
  const typename G::Element** ptr_b;
  typename G::Element** ptr_d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  size_t bytes;  // total bytes used, 256-aligned; the CUTLASS workspace follows

  ArgArrays(void* base, int groups) {
    size_t off = 0;
    auto carve = [&](size_t each) {
      void* p = static_cast<char*>(base) + off;
      off = align_up(off + each * size_t(groups), 256);
      return p;
    };
    shapes = static_cast<typename G::Shape3*>(carve(sizeof(typename G::Shape3)));
    ptr_a = static_cast<const typename G::Element**>(carve(sizeof(void*)));
    ptr_b = static_cast<const typename G::Element**>(carve(sizeof(void*)));
    ptr_d = static_cast<typename G::Element**>(carve(sizeof(void*)));
    stride_a = static_cast<typename G::StrideA*>(carve(sizeof(typename G::StrideA)));
    stride_b = static_cast<typename G::StrideB*>(carve(sizeof(typename G::StrideB)));
    stride_d = static_cast<typename G::StrideD*>(carve(sizeof(typename G::StrideD)));
    bytes = off;
  }
};

template <class G, Mode M>
__global__ void build_args(GroupedGemmArgs args, ArgArrays<G> out) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= args.num_groups) return;
  const GroupOperands o = group_operands<M>(args, g);
  using E = typename G::Element;
  out.shapes[g] = make_shape(o.m, o.n, o.k);
  out.ptr_a[g] = static_cast<const E*>(args.a) + o.off_a;
  out.ptr_b[g] = static_cast<const E*>(args.b) + o.off_b;
  out.ptr_d[g] = static_cast<E*>(args.d) + o.off_d;
  out.stride_a[g] = leading_dim_stride<typename G::StrideA>(o.lda);
  out.stride_b[g] = leading_dim_stride<typename G::StrideB>(o.ldb);
  out.stride_d[g] = leading_dim_stride<typename G::StrideD>(o.ldd);
}

template <class G>
typename G::Gemm::Arguments make_arguments(const ArgArrays<G>& arr, int groups, int device) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  typename G::Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, arr.shapes, nullptr},  // no host shapes: the scheduler launches one wave of SMs
      {arr.ptr_a, arr.stride_a, arr.ptr_b, arr.stride_b},
      {{}, nullptr, nullptr, arr.ptr_d, arr.stride_d},
      hw};
  arguments.epilogue.thread.alpha = 1.0f;
  arguments.epilogue.thread.beta = 0.0f;
  return arguments;
}

}  // namespace

template <DType D, Mode M>
size_t sm90_grouped_gemm_workspace(int num_groups, int device) {
  using G = Sm90Gemm<D, M>;
  ArgArrays<G> arr(nullptr, num_groups);
  return arr.bytes + G::Gemm::get_workspace_size(make_arguments<G>(arr, num_groups, device));
}

template <DType D, Mode M>
const char* sm90_grouped_gemm(const GroupedGemmArgs& args) {
  using G = Sm90Gemm<D, M>;
  if (args.num_groups <= 0) return nullptr;
  if (args.k % G::kAlignment || args.n % G::kAlignment) {
    return "sm90 grouped GEMM needs K and N to be multiples of 8 (16-byte TMA rows)";
  }
  ArgArrays<G> arr(args.workspace, args.num_groups);
  auto arguments = make_arguments<G>(arr, args.num_groups, args.device);
  if (arr.bytes + G::Gemm::get_workspace_size(arguments) > args.workspace_bytes) {
    return "sm90 grouped GEMM: workspace too small";
  }
  constexpr int kThreads = 128;
  build_args<G, M><<<(args.num_groups + kThreads - 1) / kThreads, kThreads, 0, args.stream>>>(
      args, arr);
  if (cudaGetLastError() != cudaSuccess) return "sm90 grouped GEMM: argument kernel launch failed";

  typename G::Gemm gemm;
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) {
    return "sm90 grouped GEMM: CUTLASS cannot implement these arguments";
  }
  void* cutlass_workspace = static_cast<char*>(args.workspace) + arr.bytes;
  cutlass::Status status = gemm.initialize(arguments, cutlass_workspace, args.stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(args.stream);
  return status == cutlass::Status::kSuccess ? nullptr : cutlass::cutlassGetStatusString(status);
}

constexpr DType kDType = static_cast<DType>(UPCLIP_DTYPE);
template size_t sm90_grouped_gemm_workspace<kDType, Mode::fprop>(int, int);
template size_t sm90_grouped_gemm_workspace<kDType, Mode::dgrad>(int, int);
template size_t sm90_grouped_gemm_workspace<kDType, Mode::wgrad>(int, int);
template const char* sm90_grouped_gemm<kDType, Mode::fprop>(const GroupedGemmArgs&);
template const char* sm90_grouped_gemm<kDType, Mode::dgrad>(const GroupedGemmArgs&);
template const char* sm90_grouped_gemm<kDType, Mode::wgrad>(const GroupedGemmArgs&);

}  // namespace upclip
