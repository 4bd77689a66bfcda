// Damped Cholesky inverse and eigendecomposition on CPU: LAPACK through ATen, one batched call
// per factor size, size buckets in parallel.
#include <torch/library.h>

#include <algorithm>

#include "aten/inversion.h"
#include "cpu/parallel.h"

namespace kfac::cpu {

namespace {

// A bucket is processed in pieces of at most this many bytes: every pass over a piece (stack,
// symmetrize, factorize, invert, check) then stays in cache, which a batch of large factors
// would not (ATen's CPU batched LAPACK loops over the matrices anyway, so nothing is lost).
constexpr int64_t kPieceBytes = 4 << 20;

std::vector<std::vector<size_t>> cache_sized_pieces(at::TensorList factors) {
  std::vector<std::vector<size_t>> pieces;
  for (const auto& bucket : bucket_by_size(factors, all_indices(factors.size()))) {
    const at::Tensor& f = factors[bucket[0]];
    const int64_t bytes = f.numel() * static_cast<int64_t>(f.element_size());
    const size_t per = static_cast<size_t>(std::max<int64_t>(1, kPieceBytes / std::max<int64_t>(1, bytes)));
    for (size_t start = 0; start < bucket.size(); start += per) {
      pieces.emplace_back(bucket.begin() + start, bucket.begin() + std::min(bucket.size(), start + per));
    }
  }
  return pieces;
}

double largest_piece_flops(at::TensorList factors,
                           const std::vector<std::vector<size_t>>& pieces) {
  double largest = 0;
  for (const auto& piece : pieces) {
    const double n = static_cast<double>(factors[piece[0]].size(0));
    largest = std::max(largest, n * n * n * static_cast<double>(piece.size()));
  }
  return largest;
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> damped_inverse(at::TensorList factors,
                                                               at::ArrayRef<double> damping) {
  check_damped_inverse_args(factors, damping);
  InverseResults out(factors.size());
  const auto pieces = cache_sized_pieces(factors);
  for_each_layer(pieces.size(), largest_piece_flops(factors, pieces),
                 [&](size_t p) { damped_inverse_aten(factors, damping, pieces[p], out); });
  return out.pack(factors[0].device());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> eigen_decompose(
    at::TensorList factors) {
  check_eigen_decompose_args(factors);
  EigenResults out(factors.size());
  const auto pieces = cache_sized_pieces(factors);
  // eigh costs roughly 10x a Cholesky of the same size.
  for_each_layer(pieces.size(), 10 * largest_piece_flops(factors, pieces),
                 [&](size_t p) { eigen_decompose_aten(factors, pieces[p], out); });
  return out.pack(factors[0].device());
}

}  // namespace kfac::cpu

TORCH_LIBRARY_IMPL(kfac_ext, CPU, m) {
  m.impl("damped_inverse", &kfac::cpu::damped_inverse);
  m.impl("eigen_decompose", &kfac::cpu::eigen_decompose);
}
