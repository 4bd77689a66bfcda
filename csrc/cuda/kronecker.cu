// Kronecker-factored products on CUDA, all through ATen: the GEMMs are cuBLAS (batched for a
// batched entry of same-shape layers), the eigenbasis division two elementwise launches per
// entry, eigen_adam's moments a dozen per layer with the keep flag read on the device. No
// custom kernel and no per-call table upload: nothing here synchronizes or copies host to
// device, so the ops can be captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "aten/kronecker.h"

namespace kfac::cuda {

std::vector<at::Tensor> kron_matmul(at::TensorList lefts, at::TensorList mats,
                                    at::TensorList rights) {
  check_kron_matmul_args(lefts, mats, rights);
  const c10::cuda::CUDAGuard guard(lefts[0].device());
  std::vector<at::Tensor> out;
  out.reserve(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) out.push_back(kron_matmul_one(lefts[i], mats[i], rights[i]));
  return out;
}

std::vector<at::Tensor> precondition_eigen(at::TensorList g_eigenvectors,
                                           at::TensorList g_eigenvalues, at::TensorList grads,
                                           at::TensorList a_eigenvectors,
                                           at::TensorList a_eigenvalues,
                                           at::ArrayRef<double> damping) {
  check_precondition_eigen_args(g_eigenvectors, g_eigenvalues, grads, a_eigenvectors,
                                a_eigenvalues, damping);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor rotated = to_eigenbasis(g_eigenvectors[i], grads[i], a_eigenvectors[i]);
    divide_by_damped_eigenvalues_aten(rotated, g_eigenvalues[i], a_eigenvalues[i], damping[i]);
    out.push_back(at::empty_like(grads[i]));
    from_eigenbasis(out.back(), g_eigenvectors[i], rotated, a_eigenvectors[i]);
  }
  return out;
}

void eigen_adam(at::TensorList g_eigenvectors, at::TensorList grads,
                const c10::List<std::optional<at::Tensor>>& a_eigenvectors, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& keep,
                double beta1, double beta2, double eps, at::TensorList directions) {
  check_eigen_adam_args(g_eigenvectors, grads, a_eigenvectors, exp_avgs, exp_avg_sqs, steps, keep,
                        beta1, beta2, eps, directions);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::optional<at::Tensor> q_a = a_eigenvectors.get(i);
    const at::Tensor rotated = to_eigenbasis(g_eigenvectors[i], grads[i], q_a);
    const at::Tensor step = adam_in_eigenbasis_aten(rotated, exp_avgs[i], exp_avg_sqs[i], steps[i],
                                                    keep, beta1, beta2, eps);
    from_eigenbasis(directions[i], g_eigenvectors[i], step, q_a);
  }
}

}  // namespace kfac::cuda

TORCH_LIBRARY_IMPL(kfac_ext, CUDA, m) {
  m.impl("kron_matmul", &kfac::cuda::kron_matmul);
  m.impl("precondition_eigen", &kfac::cuda::precondition_eigen);
  m.impl("eigen_adam", &kfac::cuda::eigen_adam);
}
