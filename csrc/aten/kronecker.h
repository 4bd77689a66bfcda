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

// left @ mat @ right^T computed in left's dtype (mat is cast up), returned in mat's dtype; the
// two GEMMs are ordered to do the fewer flops.
at::Tensor kron_matmul_one(const at::Tensor& left, const at::Tensor& mat, const at::Tensor& right);

// Q_G^T grad Q_A in the eigenvectors' dtype: the gradient in the Kronecker eigenbasis.
at::Tensor to_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& grad,
                         const at::Tensor& a_eigenvectors);

// Q_G rotated Q_A^T, returned in out_dtype.
at::Tensor from_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& rotated,
                           const at::Tensor& a_eigenvectors, at::ScalarType out_dtype);

}  // namespace kfac
