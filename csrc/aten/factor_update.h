// Factor update: F <- decay F + scale xbar^T xbar. Host-side pieces shared by the CPU and CUDA
// implementations: argument checks and the per-layer path over ATen (GEMM + epilogue).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

namespace kfac {

// Validates one call of factor_update; throws with the op and argument named.
void check_factor_update_args(at::TensorList factors, at::TensorList xs, double decay,
                              at::ArrayRef<double> scales, const c10::List<bool>& append_ones);

// One layer through ATen: GEMM in the factor's dtype (x is cast first, so bf16/fp16 inputs
// accumulate in at least fp32), ones column from column sums, corner = rows. Only the upper
// triangle is meaningful afterwards: the caller mirrors it (exact symmetry).
void factor_update_one_aten(const at::Tensor& factor, const at::Tensor& x, double decay,
                            double scale, bool append_ones);

// Strict lower triangle <- transpose of the strict upper one, on any device (three temporaries;
// the CPU implementation has an in-place loop instead).
void mirror_upper_aten(const at::Tensor& factor);

}  // namespace kfac
