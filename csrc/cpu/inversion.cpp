// Damped Cholesky inverse and eigendecomposition on CPU: LAPACK through ATen, one batched call
// per factor size, size buckets in parallel.
#include <torch/library.h>

#include <algorithm>

#include "aten/inversion.h"
#include "cpu/parallel.h"

namespace kfac::cpu {

namespace {

double largest_bucket_flops(at::TensorList factors,
                            const std::vector<std::vector<size_t>>& buckets) {
  double largest = 0;
  for (const auto& bucket : buckets) {
    const double n = static_cast<double>(factors[bucket[0]].size(0));
    largest = std::max(largest, n * n * n * static_cast<double>(bucket.size()));
  }
  return largest;
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> damped_inverse(at::TensorList factors,
                                                               at::ArrayRef<double> damping) {
  check_damped_inverse_args(factors, damping);
  InverseResults out(factors.size());
  const auto buckets = bucket_by_size(factors, all_indices(factors.size()));
  for_each_layer(buckets.size(), largest_bucket_flops(factors, buckets),
                 [&](size_t b) { damped_inverse_aten(factors, damping, buckets[b], out); });
  return out.pack(factors[0].device());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> eigen_decompose(
    at::TensorList factors) {
  check_eigen_decompose_args(factors);
  EigenResults out(factors.size());
  const auto buckets = bucket_by_size(factors, all_indices(factors.size()));
  // eigh costs roughly 10x a Cholesky of the same size.
  for_each_layer(buckets.size(), 10 * largest_bucket_flops(factors, buckets),
                 [&](size_t b) { eigen_decompose_aten(factors, buckets[b], out); });
  return out.pack(factors[0].device());
}

}  // namespace kfac::cpu

TORCH_LIBRARY_IMPL(kfac_ext, CPU, m) {
  m.impl("damped_inverse", &kfac::cpu::damped_inverse);
  m.impl("eigen_decompose", &kfac::cpu::eigen_decompose);
}
