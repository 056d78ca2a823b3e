// Plain CUDA launchers of fastdd's kernels (no torch headers: the .cu files compile in seconds).
// fastdd_ops.cpp is the thin torch binding that checks tensors and calls these.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fastdd {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Add per-class sums (and sums of squares when sq != nullptr) of x [B, D] (strides sb, sd) into
// sums/sq [C, D] (fp32, or fp64 when acc_double) and counts [C]; float atomics.
void launch_class_sums_atomic(const void* x, ScalarKind x_kind, const int64_t* labels, void* sums, void* sq,
                              bool acc_double, unsigned long long* counts, int64_t B, int64_t D, int64_t sb,
                              int64_t sd, cudaStream_t stream);

// Same sums for rows grouped by class: rows order[offsets[c] .. offsets[c+1]) belong to class c.
// One thread per (class, column), fixed summation order: deterministic.
void launch_class_sums_sorted(const void* x, ScalarKind x_kind, const int64_t* order, const int64_t* offsets,
                              void* sums, void* sq, bool acc_double, int64_t C, int64_t D, int64_t sb, int64_t sd,
                              cudaStream_t stream);

// One warp per row of logits [R, C] (fp32, contiguous): loss[r] = lse - s[r, y[r]] with
// s = logits * scale + bias; when row_grad != nullptr the row is overwritten with
// row_grad[0] * (softmax(s) - onehot(y)).
void launch_cross_entropy_rows(float* logits, const int64_t* labels, const float* bias, float scale, int64_t R,
                               int64_t C, float* loss, const float* row_grad, cudaStream_t stream);

}  // namespace fastdd
