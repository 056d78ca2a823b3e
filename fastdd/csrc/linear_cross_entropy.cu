// Row-wise part of the chunked cross-entropy (see fastdd/ops/linear_cross_entropy.py and the chunk loop
// in fastdd_ops.cpp): one warp per row of fp32 logits computes the log-sum-exp and the loss and, when a
// gradient is wanted, overwrites the row with row_grad * (softmax - onehot).
#include "fastdd_kernels.h"

namespace fastdd {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void cross_entropy_rows_kernel(float* __restrict__ logits, const int64_t* __restrict__ labels,
                                          const float* __restrict__ bias, float scale, int64_t R, int64_t C,
                                          float* __restrict__ loss, const float* __restrict__ row_grad) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= R) return;
  float* row = logits + r * C;
  float m = -INFINITY;
  for (int64_t c = lane; c < C; c += 32) m = fmaxf(m, row[c] * scale + (bias ? bias[c] : 0.f));
  m = warp_max(m);
  float sum = 0.f;
  for (int64_t c = lane; c < C; c += 32) sum += __expf(row[c] * scale + (bias ? bias[c] : 0.f) - m);
  sum = warp_sum(sum);
  const float lse = m + logf(sum);
  const int64_t y = labels[r];
  if (lane == 0) loss[r] = lse - (row[y] * scale + (bias ? bias[y] : 0.f));
  if (row_grad == nullptr) return;
  __syncwarp();  // lane 0 has read row[y] before any lane overwrites it
  const float g = row_grad[0];
  for (int64_t c = lane; c < C; c += 32) {
    const float p = __expf(row[c] * scale + (bias ? bias[c] : 0.f) - lse);
    row[c] = g * (p - (c == y ? 1.f : 0.f));
  }
}

}  // namespace

void launch_cross_entropy_rows(float* logits, const int64_t* labels, const float* bias, float scale, int64_t R,
                               int64_t C, float* loss, const float* row_grad, cudaStream_t stream) {
  if (R == 0) return;
  const unsigned blocks = static_cast<unsigned>((R + kWarpsPerBlock - 1) / kWarpsPerBlock);
  cross_entropy_rows_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(logits, labels, bias, scale, R, C, loss,
                                                                          row_grad);
}

}  // namespace fastdd
