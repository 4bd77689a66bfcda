// Kronecker-factored products: (L kron R) vec(C) = vec(L C R^T) for row-major vec, and the
// eigenbasis preconditioner. Host-side pieces shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace kfac {

void check_kron_matmul_args(at::TensorList lefts, at::TensorList mats, at::TensorList rights);

void check_precondition_eigen_args(at::TensorList g_eigenvectors, at::TensorList g_eigenvalues,
                                   at::TensorList grads, at::TensorList a_eigenvectors,
                                   at::TensorList a_eigenvalues, at::ArrayRef<double> damping);

// Every entry is one layer (matrices [m, n], eigenvalues [n]) or a batch of same-shape layers
// (a leading batch dim on every tensor of the entry), done as batched GEMMs.

// left @ mat @ right^T computed in left's dtype (mat is cast up), returned in mat's dtype; the
// two GEMMs are ordered to do the fewer flops.
at::Tensor kron_matmul_one(const at::Tensor& left, const at::Tensor& mat, const at::Tensor& right);

// Q_G^T grad Q_A in the eigenvectors' dtype, contiguous: the gradient in the Kronecker eigenbasis.
at::Tensor to_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& grad,
                         const at::Tensor& a_eigenvectors);

// rotated /= lambda_G lambda_A^T + damping, in place, through ATen (any device; two elementwise
// launches: the CPU implementation has a fused loop instead).
void divide_by_damped_eigenvalues_aten(const at::Tensor& rotated, const at::Tensor& g_eigenvalues,
                                       const at::Tensor& a_eigenvalues, double damping);

// Q_G rotated Q_A^T, returned in out_dtype.
at::Tensor from_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& rotated,
                           const at::Tensor& a_eigenvectors, at::ScalarType out_dtype);

}  // namespace kfac
