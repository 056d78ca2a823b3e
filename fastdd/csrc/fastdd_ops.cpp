// Thin torch binding of fastdd's CUDA kernels (built as fastdd._C by setup.py, or just in time by
// fastdd/_ext.py). The Python wrappers in fastdd/ops/ validate arguments and own the semantics; this
// file checks what the kernels rely on (devices, dtypes, contiguity) and runs the chunk loop of the
// streamed cross-entropy (cuBLAS products through at::mm, the row-wise kernel in between).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <tuple>

#include "fastdd_kernels.h"

namespace fastdd {
namespace {

ScalarKind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kDouble: return ScalarKind::kFloat64;
    default: TORCH_CHECK(false, "features must be fp16, bf16, fp32 or fp64, got ", t.scalar_type());
  }
  return ScalarKind::kFloat32;
}

void check_accumulators(const at::Tensor& x, const at::Tensor& sums, const at::Tensor& sq) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "features must be a 2-D CUDA tensor");
  TORCH_CHECK(sums.device() == x.device() && sums.is_contiguous() && sums.dim() == 2 && sums.size(1) == x.size(1),
              "sums must be a contiguous tensor [C, D] on the features' device");
  TORCH_CHECK(sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble, "sums must be fp32 or fp64");
  TORCH_CHECK(sq.numel() == 0 || (sq.sizes() == sums.sizes() && sq.scalar_type() == sums.scalar_type() &&
                                  sq.is_contiguous() && sq.device() == x.device()),
              "sq_sums must be empty or match sums");
}

void class_centers_atomic(const at::Tensor& features, const at::Tensor& labels, at::Tensor& sums,
                          at::Tensor& counts, at::Tensor& sq_sums) {
  check_accumulators(features, sums, sq_sums);
  TORCH_CHECK(labels.device() == features.device() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == features.size(0),
              "labels must be a contiguous int64 tensor [B] on the features' device");
  TORCH_CHECK(counts.device() == features.device() && counts.scalar_type() == at::kLong && counts.is_contiguous() &&
                  counts.numel() == sums.size(0),
              "counts must be a contiguous int64 tensor [C] on the features' device");
  const c10::cuda::CUDAGuard guard(features.device());
  launch_class_sums_atomic(features.data_ptr(), kind_of(features), labels.data_ptr<int64_t>(), sums.data_ptr(),
                           sq_sums.numel() ? sq_sums.data_ptr() : nullptr, sums.scalar_type() == at::kDouble,
                           reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), features.size(0),
                           features.size(1), features.stride(0), features.stride(1),
                           c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void class_centers_sorted(const at::Tensor& features, const at::Tensor& order, const at::Tensor& offsets,
                          at::Tensor& sums, at::Tensor& sq_sums) {
  check_accumulators(features, sums, sq_sums);
  TORCH_CHECK(order.device() == features.device() && order.scalar_type() == at::kLong && order.is_contiguous() &&
                  order.numel() == features.size(0),
              "order must be a contiguous int64 tensor [B] on the features' device");
  TORCH_CHECK(offsets.device() == features.device() && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous() && offsets.numel() == sums.size(0) + 1,
              "offsets must be a contiguous int64 tensor [C + 1] on the features' device");
  const c10::cuda::CUDAGuard guard(features.device());
  if (features.size(0) == 0) return;
  launch_class_sums_sorted(features.data_ptr(), kind_of(features), order.data_ptr<int64_t>(),
                           offsets.data_ptr<int64_t>(), sums.data_ptr(), sq_sums.numel() ? sq_sums.data_ptr() : nullptr,
                           sums.scalar_type() == at::kDouble, sums.size(0), features.size(1), features.stride(0),
                           features.stride(1), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Returns (loss_sum [] fp32, dW [D, C] fp32 or empty, db [C] fp32 or empty, dz [M, D] fp32 or empty).
// Per chunk of rows: fp32 logits by at::mm (cuBLAS; TF32 when torch allows it), the row-wise kernel
// (loss, and Delta = g (softmax - onehot) in place), then dW += scale z^T Delta and dz = scale Delta W^T.
// Memory: chunk x C (+ chunk x D) fp32, never M x C.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_chunked(
    const at::Tensor& z, const at::Tensor& y, const at::Tensor& W, const at::Tensor& bias, double scale,
    const at::Tensor& row_grad, bool want_grad_w, bool want_grad_z, int64_t chunk_rows) {
  TORCH_CHECK(z.is_cuda() && z.dim() == 2, "z must be a 2-D CUDA tensor");
  TORCH_CHECK(W.device() == z.device() && W.dim() == 2 && W.size(0) == z.size(1), "W must be [D, C] on z's device");
  TORCH_CHECK(y.device() == z.device() && y.scalar_type() == at::kLong && y.is_contiguous() && y.numel() == z.size(0),
              "y must be a contiguous int64 tensor [M] on z's device");
  TORCH_CHECK(bias.numel() == 0 || (bias.device() == z.device() && bias.numel() == W.size(1)),
              "bias must be empty or [C] on z's device");
  TORCH_CHECK(row_grad.device() == z.device() && row_grad.scalar_type() == at::kFloat && row_grad.numel() == 1,
              "row_grad must be a one-element fp32 tensor on z's device");
  TORCH_CHECK(chunk_rows > 0, "chunk_rows must be positive");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t M = z.size(0), D = z.size(1), C = W.size(1);
  const bool want_grad = want_grad_w || want_grad_z;
  const auto f32 = z.options().dtype(at::kFloat);
  const at::Tensor Wf = W.to(at::kFloat);
  const at::Tensor bias_f = bias.numel() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor loss_sum = at::zeros({}, f32);
  at::Tensor dW = want_grad_w ? at::zeros({D, C}, f32) : at::empty({0}, f32);
  at::Tensor db = (want_grad_w && bias.numel()) ? at::zeros({C}, f32) : at::empty({0}, f32);
  at::Tensor dz = want_grad_z ? at::empty({M, D}, f32) : at::empty({0}, f32);
  for (int64_t r0 = 0; r0 < M; r0 += chunk_rows) {
    const int64_t R = std::min(chunk_rows, M - r0);
    const at::Tensor zc = z.narrow(0, r0, R).to(at::kFloat);
    at::Tensor logits = at::mm(zc, Wf).contiguous();
    at::Tensor loss = at::empty({R}, f32);
    launch_cross_entropy_rows(logits.data_ptr<float>(), y.data_ptr<int64_t>() + r0,
                              bias.numel() ? bias_f.data_ptr<float>() : nullptr, static_cast<float>(scale), R, C,
                              loss.data_ptr<float>(), want_grad ? row_grad.data_ptr<float>() : nullptr,
                              c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss_sum.add_(loss.sum());
    if (!want_grad) continue;
    if (want_grad_w) {  // logits now holds Delta, the gradient w.r.t. the scaled logits
      dW.addmm_(zc.t(), logits, /*beta=*/1.0, /*alpha=*/scale);
      if (db.numel()) db.add_(logits.sum(0));
    }
    if (want_grad_z) dz.narrow(0, r0, R).copy_(at::mm(logits, Wf.t()).mul_(scale));
  }
  return {loss_sum, dW, db, dz};
}

}  // namespace
}  // namespace fastdd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdd CUDA kernels (optional backend; see fastdd._ext)";
  m.def("class_centers_atomic", &fastdd::class_centers_atomic,
        "Add per-class sums/counts/sq-sums of features into accumulators (float atomics)");
  m.def("class_centers_sorted", &fastdd::class_centers_sorted,
        "Add per-class sums/sq-sums of rows grouped by class (deterministic, no float atomics)");
  m.def("linear_cross_entropy_chunked", &fastdd::linear_cross_entropy_chunked,
        "Streamed cross-entropy of z @ W * scale + bias: (loss_sum, dW, db, dz)");
}
