// Factor update: F <- decay F + scale xbar^T xbar. Host-side pieces shared by the CPU and CUDA
// implementations: the argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

namespace kfac {

// Validates one call of factor_update; throws with the op and argument named.
void check_factor_update_args(at::TensorList factors, at::TensorList xs, double decay,
                              at::ArrayRef<double> scales, const c10::List<bool>& append_ones);

}  // namespace kfac
