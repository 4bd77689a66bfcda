// Kronecker-factored products: (L kron R) vec(C) = vec(L C R^T) for row-major vec, and the
// eigenbasis preconditioner. Host-side pieces shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace kfac {

void check_kron_matmul_args(at::TensorList lefts, at::TensorList mats, at::TensorList rights);

void check_precondition_eigen_args(at::TensorList g_eigenvectors, at::TensorList g_eigenvalues,
                                   at::TensorList grads, at::TensorList a_eigenvectors,
                                   at::TensorList a_eigenvalues, at::ArrayRef<double> damping);

// eigen_adam: one layer per entry (2-D gradients); a_eigenvectors[i] absent for a diagonal A.
void check_eigen_adam_args(at::TensorList g_eigenvectors, at::TensorList grads,
                           const c10::List<std::optional<at::Tensor>>& a_eigenvectors,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList steps, const at::Tensor& keep, double beta1,
                           double beta2, double eps, at::TensorList directions);

// Every entry is one layer (matrices [m, n], eigenvalues [n]) or a batch of same-shape layers
// (a leading batch dim on every tensor of the entry), done as batched GEMMs.

// left @ mat @ right^T computed in left's dtype (mat is cast up), returned in mat's dtype; the
// two GEMMs are ordered to do the fewer flops.
at::Tensor kron_matmul_one(const at::Tensor& left, const at::Tensor& mat, const at::Tensor& right);

// Q_G^T grad Q_A in the eigenvectors' dtype, contiguous: the gradient in the Kronecker eigenbasis
// (without Q_A, a diagonal A's identity basis: Q_G^T grad).
at::Tensor to_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& grad,
                         const std::optional<at::Tensor>& a_eigenvectors);

// rotated /= lambda_G lambda_A^T + damping, in place, through ATen (any device; two elementwise
// launches: the CPU implementation has a fused loop instead).
void divide_by_damped_eigenvalues_aten(const at::Tensor& rotated, const at::Tensor& g_eigenvalues,
                                       const at::Tensor& a_eigenvalues, double damping);

// out <- Q_G rotated Q_A^T (without Q_A: Q_G rotated); out's dtype may differ from the
// eigenvectors' (the result is cast into it).
void from_eigenbasis(at::Tensor out, const at::Tensor& g_eigenvectors, const at::Tensor& rotated,
                     const std::optional<at::Tensor>& a_eigenvectors);

// eigen_adam's moment update and normalized step of one layer through ATen (any device; the
// flag stays on the device): where keep, exp_avg, exp_avg_sq and step advance; returns
// m^ / (sqrt(v^) + eps) with the bias corrections of the (advanced) step. The CPU
// implementation has a fused loop instead.
at::Tensor adam_in_eigenbasis_aten(const at::Tensor& rotated, const at::Tensor& exp_avg,
                                   const at::Tensor& exp_avg_sq, const at::Tensor& step,
                                   const at::Tensor& keep, double beta1, double beta2, double eps);

}  // namespace kfac
