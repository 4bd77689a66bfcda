// Kronecker-factored products on CPU: ATen GEMMs per entry (a layer, or a batch of same-shape
// layers as one batched GEMM), entries in parallel when small, and the eigenbasis division fused
// into one pass over the rotated gradient.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "aten/kronecker.h"
#include "cpu/parallel.h"

namespace kfac::cpu {

namespace {

double largest_layer_flops(at::TensorList mats) {
  double largest = 0;
  for (const at::Tensor& c : mats) {
    const double m = static_cast<double>(c.size(-2)), n = static_cast<double>(c.size(-1));
    const double batch = c.dim() == 3 ? static_cast<double>(c.size(0)) : 1.0;
    largest = std::max(largest, 2.0 * batch * m * n * (m + n));
  }
  return largest;
}

// rotated[b, i, j] /= g_eigenvalues[b, i] * a_eigenvalues[b, j] + damping, in place, one pass
// (b over the batch of a batched entry; rotated is contiguous).
void divide_by_damped_eigenvalues(const at::Tensor& rotated, const at::Tensor& g_eigenvalues,
                                  const at::Tensor& a_eigenvalues, double damping) {
  AT_DISPATCH_FLOATING_TYPES(rotated.scalar_type(), "precondition_eigen", [&] {
    const int64_t batch = rotated.dim() == 3 ? rotated.size(0) : 1;
    const int64_t rows = rotated.size(-2), cols = rotated.size(-1);
    const auto gamma = static_cast<scalar_t>(damping);
    for (int64_t b = 0; b < batch; ++b) {
      scalar_t* t = rotated.data_ptr<scalar_t>() + b * rows * cols;
      const scalar_t* lg = g_eigenvalues.data_ptr<scalar_t>() + b * rows;
      const scalar_t* la = a_eigenvalues.data_ptr<scalar_t>() + b * cols;
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* row = t + i * cols;
        for (int64_t j = 0; j < cols; ++j) row[j] /= lg[i] * la[j] + gamma;
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> kron_matmul(at::TensorList lefts, at::TensorList mats,
                                    at::TensorList rights) {
  check_kron_matmul_args(lefts, mats, rights);
  std::vector<at::Tensor> out(mats.size());
  for_each_layer(mats.size(), largest_layer_flops(mats),
                 [&](size_t i) { out[i] = kron_matmul_one(lefts[i], mats[i], rights[i]); });
  return out;
}

std::vector<at::Tensor> precondition_eigen(at::TensorList g_eigenvectors,
                                           at::TensorList g_eigenvalues, at::TensorList grads,
                                           at::TensorList a_eigenvectors,
                                           at::TensorList a_eigenvalues,
                                           at::ArrayRef<double> damping) {
  check_precondition_eigen_args(g_eigenvectors, g_eigenvalues, grads, a_eigenvectors,
                                a_eigenvalues, damping);
  std::vector<at::Tensor> out(grads.size());
  for_each_layer(grads.size(), 2 * largest_layer_flops(grads), [&](size_t i) {
    const at::Tensor rotated = to_eigenbasis(g_eigenvectors[i], grads[i], a_eigenvectors[i]);
    divide_by_damped_eigenvalues(rotated, g_eigenvalues[i], a_eigenvalues[i], damping[i]);
    out[i] = from_eigenbasis(g_eigenvectors[i], rotated, a_eigenvectors[i],
                             grads[i].scalar_type());
  });
  return out;
}

}  // namespace kfac::cpu

TORCH_LIBRARY_IMPL(kfac_ext, CPU, m) {
  m.impl("kron_matmul", &kfac::cpu::kron_matmul);
  m.impl("precondition_eigen", &kfac::cpu::precondition_eigen);
}
