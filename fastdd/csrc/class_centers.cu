// Per-class feature sums / counts / second moments (see fastdd/ops/class_centers.py for the math).
//
// Atomic kernel: one thread per column walks a group of rows in order, keeping a running sum while the
//   label stays the same and flushing it with one atomicAdd when it changes, so class-ordered data costs
//   one atomic per run instead of one per element.
// Sorted kernel: rows grouped by class beforehand (a stable sort, done by the caller); one thread per
//   (class, column) sums its class's rows in a fixed order: no float atomics, run-to-run identical.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastdd_kernels.h"

namespace fastdd {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerGroup = 64;

template <typename acc_t> __device__ __forceinline__ acc_t load_as(const float* p) { return static_cast<acc_t>(*p); }
template <typename acc_t> __device__ __forceinline__ acc_t load_as(const double* p) { return static_cast<acc_t>(*p); }
template <typename acc_t> __device__ __forceinline__ acc_t load_as(const __half* p) {
  return static_cast<acc_t>(__half2float(*p));
}
template <typename acc_t> __device__ __forceinline__ acc_t load_as(const __nv_bfloat16* p) {
  return static_cast<acc_t>(__bfloat162float(*p));
}

template <typename scalar_t, typename acc_t>
__global__ void class_sums_atomic_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                         acc_t* __restrict__ sums, acc_t* __restrict__ sq,
                                         unsigned long long* __restrict__ counts, int64_t B, int64_t D, int64_t sb,
                                         int64_t sd) {
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerGroup;
  const int64_t row_end = row0 + kRowsPerGroup < B ? row0 + kRowsPerGroup : B;
  if (blockIdx.y == 0 && threadIdx.x < kRowsPerGroup && row0 + threadIdx.x < B) {
    atomicAdd(counts + labels[row0 + threadIdx.x], 1ULL);
  }
  if (d >= D || row0 >= B) return;
  int64_t current = labels[row0];
  acc_t run = 0, run_sq = 0;
  for (int64_t r = row0; r < row_end; ++r) {
    const int64_t label = labels[r];
    if (label != current) {
      atomicAdd(sums + current * D + d, run);
      if (sq) atomicAdd(sq + current * D + d, run_sq);
      run = 0;
      run_sq = 0;
      current = label;
    }
    const acc_t v = load_as<acc_t>(x + r * sb + d * sd);
    run += v;
    run_sq += v * v;
  }
  atomicAdd(sums + current * D + d, run);
  if (sq) atomicAdd(sq + current * D + d, run_sq);
}

template <typename scalar_t, typename acc_t>
__global__ void class_sums_sorted_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ order,
                                         const int64_t* __restrict__ offsets, acc_t* __restrict__ sums,
                                         acc_t* __restrict__ sq, int64_t D, int64_t sb, int64_t sd) {
  const int64_t c = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (d >= D) return;
  acc_t acc = 0, acc_sq = 0;
  for (int64_t p = offsets[c]; p < offsets[c + 1]; ++p) {
    const acc_t v = load_as<acc_t>(x + order[p] * sb + d * sd);
    acc += v;
    acc_sq += v * v;
  }
  sums[c * D + d] += acc;
  if (sq) sq[c * D + d] += acc_sq;
}

template <typename scalar_t, typename acc_t>
void atomic_typed(const void* x, const int64_t* labels, void* sums, void* sq, unsigned long long* counts, int64_t B,
                  int64_t D, int64_t sb, int64_t sd, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((B + kRowsPerGroup - 1) / kRowsPerGroup),
                  static_cast<unsigned>((D + kThreads - 1) / kThreads));
  class_sums_atomic_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(x), labels, static_cast<acc_t*>(sums), static_cast<acc_t*>(sq), counts, B, D, sb,
      sd);
}

template <typename scalar_t, typename acc_t>
void sorted_typed(const void* x, const int64_t* order, const int64_t* offsets, void* sums, void* sq, int64_t C,
                  int64_t D, int64_t sb, int64_t sd, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>((D + kThreads - 1) / kThreads));
  class_sums_sorted_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(x), order, offsets, static_cast<acc_t*>(sums), static_cast<acc_t*>(sq), D, sb, sd);
}

// Calls F<scalar_t, acc_t> for the runtime (input kind, accumulator) pair.
#define FASTDD_DISPATCH(F, kind, acc_double, ...)                                                   \
  do {                                                                                              \
    switch (kind) {                                                                                 \
      case ScalarKind::kFloat32:                                                                    \
        acc_double ? F<float, double>(__VA_ARGS__) : F<float, float>(__VA_ARGS__);                  \
        break;                                                                                      \
      case ScalarKind::kFloat16:                                                                    \
        acc_double ? F<__half, double>(__VA_ARGS__) : F<__half, float>(__VA_ARGS__);                \
        break;                                                                                      \
      case ScalarKind::kBFloat16:                                                                   \
        acc_double ? F<__nv_bfloat16, double>(__VA_ARGS__) : F<__nv_bfloat16, float>(__VA_ARGS__);  \
        break;                                                                                      \
      case ScalarKind::kFloat64:                                                                    \
        acc_double ? F<double, double>(__VA_ARGS__) : F<double, float>(__VA_ARGS__);                \
        break;                                                                                      \
    }                                                                                               \
  } while (0)

}  // namespace

void launch_class_sums_atomic(const void* x, ScalarKind x_kind, const int64_t* labels, void* sums, void* sq,
                              bool acc_double, unsigned long long* counts, int64_t B, int64_t D, int64_t sb,
                              int64_t sd, cudaStream_t stream) {
  if (B == 0 || D == 0) return;
  FASTDD_DISPATCH(atomic_typed, x_kind, acc_double, x, labels, sums, sq, counts, B, D, sb, sd, stream);
}

void launch_class_sums_sorted(const void* x, ScalarKind x_kind, const int64_t* order, const int64_t* offsets,
                              void* sums, void* sq, bool acc_double, int64_t C, int64_t D, int64_t sb, int64_t sd,
                              cudaStream_t stream) {
  if (C == 0 || D == 0) return;
  FASTDD_DISPATCH(sorted_typed, x_kind, acc_double, x, order, offsets, sums, sq, C, D, sb, sd, stream);
}

}  // namespace fastdd
