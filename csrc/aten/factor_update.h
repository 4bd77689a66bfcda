// Factor update: F <- decay F + scale xbar^T xbar. Host-side pieces shared by the CPU and CUDA
// implementations: the argument checks and the precision rule of the ones column's corner.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>

namespace kfac {

// Validates one call of factor_update; throws with the op and argument named.
void check_factor_update_args(at::TensorList factors, at::TensorList xs, double decay,
                              at::ArrayRef<double> scales, const c10::List<bool>& append_ones);

// With the ones column appended, the corner F[d, d] gains scale * rows (a sum of rows ones). One
// precision rule on every path (CPU, the CUDA GEMM path, the fused CUDA kernel, the pure-PyTorch
// reference): like every other element, the corner is computed in the factor's dtype T, from
// decay, scale and rows each rounded to T:
//   corner <- T(decay) * corner + corner_increment<T>(scale, rows)   (decay 0: the increment alone)
// The paths may still differ in the last bit (a fused multiply-add where the compiler contracts),
// never by a double-precision product rounded once against a float32 one.
template <typename T>
C10_HOST_DEVICE inline T corner_increment(double scale, int64_t rows) {
  return static_cast<T>(scale) * static_cast<T>(rows);
}

}  // namespace kfac
