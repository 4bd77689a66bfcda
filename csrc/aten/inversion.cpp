#include "aten/inversion.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/all.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/cholesky_inverse.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <map>

#include "checks.h"

namespace kfac {

namespace {

void check_factors(std::string_view op, at::TensorList factors) {
  check_not_empty(op, "factors", factors.size());
  for (size_t i = 0; i < factors.size(); ++i) {
    check_square(op, "factors", i, factors[i]);
    check_factor_dtype(op, "factors", i, factors[i]);
    check_same_dtype(op, "factors", i, factors[i], "factors", factors[0]);
    check_contiguous(op, "factors", i, factors[i]);
    check_same_device(op, "factors", i, factors[i], factors[0]);
  }
}

at::Tensor status_tensor(const std::vector<int32_t>& status, const at::Device& device) {
  at::Tensor host = at::from_blob(const_cast<int32_t*>(status.data()),
                                  {static_cast<int64_t>(status.size())}, at::kInt);
  return host.to(device, at::kInt, /*non_blocking=*/false, /*copy=*/true);
}

// The factors of one bucket (all n x n) stacked in `dtype` and symmetrized, so that both solvers
// see the same matrix whichever triangle they read.
at::Tensor stack_symmetrized(at::TensorList factors, const std::vector<size_t>& bucket,
                             at::ScalarType dtype) {
  std::vector<at::Tensor> mats;
  mats.reserve(bucket.size());
  for (size_t i : bucket) mats.push_back(factors[i].to(dtype));
  const at::Tensor batch = mats.size() == 1 ? mats[0].unsqueeze(0) : at::stack(mats);
  return (batch + batch.mT()).mul_(0.5);
}

at::Tensor finite_per_matrix(const at::Tensor& batch) {
  return at::isfinite(batch).flatten(1).all(1);
}

std::vector<bool> to_host(const at::Tensor& flags) {
  const at::Tensor host = flags.to(at::kCPU, at::kBool).contiguous();
  const bool* p = host.data_ptr<bool>();
  return std::vector<bool>(p, p + host.numel());
}

// Matrices whose flag is unset are swapped for the identity before the next library call, so it
// never sees NaN (unspecified behaviour) or a failed factor (cholesky_inverse throws on a zero
// pivot and would lose the whole batch); their results are discarded anyway. No copy when every
// flag is set, the common case.
at::Tensor identity_where_not(const at::Tensor& batch, const at::Tensor& keep,
                              const std::vector<bool>& keep_host) {
  if (std::all_of(keep_host.begin(), keep_host.end(), [](bool b) { return b; })) return batch;
  const at::Tensor eye = at::eye(batch.size(-1), batch.options());
  return at::where(keep.view({-1, 1, 1}), batch, eye);
}

// Results are slices of one batch; outputs must not alias each other, so slices get their own
// storage when the batch holds more than one.
at::Tensor own(const at::Tensor& batch, int64_t k) {
  return batch.size(0) == 1 ? batch[k] : batch[k].clone();
}

void invert_bucket(at::TensorList factors, at::ArrayRef<double> damping,
                   const std::vector<size_t>& bucket, at::ScalarType dtype, bool is_retry,
                   InverseResults& out) {
  const at::Tensor batch = stack_symmetrized(factors, bucket, dtype);
  std::vector<double> gammas;
  for (size_t i : bucket) gammas.push_back(damping[i]);
  const at::Tensor gamma =
      at::from_blob(gammas.data(), {static_cast<int64_t>(gammas.size()), 1}, at::kDouble)
          .to(batch.device(), dtype, false, true);
  const at::Tensor finite = finite_per_matrix(batch);
  const std::vector<bool> finite_h = to_host(finite);
  at::Tensor damped = identity_where_not(batch, finite, finite_h);
  damped.diagonal(0, -2, -1).add_(gamma);
  const auto [chol_raw, info] = at::linalg_cholesky_ex(damped);
  // A pivot that overflowed (inf) passes LAPACK's check; it shows on the diagonal.
  const at::Tensor factored =
      info.eq(0).logical_and(at::isfinite(chol_raw.diagonal(0, -2, -1)).all(-1));
  const at::Tensor chol = identity_where_not(chol_raw, factored, to_host(factored));
  at::Tensor inv = at::cholesky_inverse(chol);
  inv = (inv + inv.mT()).mul_(0.5);
  const at::ScalarType out_dtype = factors[bucket[0]].scalar_type();
  // Contiguous outputs (the sum above and LAPACK's column-major results need not be); a float64
  // retry may overflow float32 in the cast: checked next.
  inv = inv.to(out_dtype).contiguous();
  const at::Tensor ok = finite.logical_and(factored).logical_and(finite_per_matrix(inv));
  const std::vector<bool> ok_h = to_host(ok);

  std::vector<size_t> retry;
  for (size_t k = 0; k < bucket.size(); ++k) {
    const size_t i = bucket[k];
    if (ok_h[k]) {
      out.inverses[i] = own(inv, k);
      out.status[i] = static_cast<int32_t>(is_retry ? Status::kOkAfterFp64Retry : Status::kOk);
      continue;
    }
    out.inverses[i] = at::zeros_like(factors[i]);
    if (!finite_h[k]) {
      out.status[i] = static_cast<int32_t>(Status::kNonFiniteInput);
    } else if (!is_retry && dtype == at::kFloat) {
      retry.push_back(i);
    } else {
      out.status[i] = static_cast<int32_t>(Status::kFailed);
    }
  }
  if (!retry.empty()) invert_bucket(factors, damping, retry, at::kDouble, true, out);
}

void eigen_bucket(at::TensorList factors, const std::vector<size_t>& bucket,
                  at::ScalarType dtype, bool is_retry, EigenResults& out) {
  const at::Tensor batch = stack_symmetrized(factors, bucket, dtype);
  const at::Tensor finite = finite_per_matrix(batch);
  const std::vector<bool> finite_h = to_host(finite);
  at::Tensor evals, evecs;
  try {
    std::tie(evals, evecs) = at::linalg_eigh(identity_where_not(batch, finite, finite_h));
  } catch (const c10::Error&) {
    // The library reports non-convergence for the whole batch: solve each factor alone so that
    // one bad factor does not fail its neighbours.
    if (bucket.size() > 1) {
      for (size_t i : bucket) eigen_bucket(factors, {i}, dtype, is_retry, out);
      return;
    }
    evals = at::zeros({1, batch.size(-1)}, batch.options());
    evecs = at::zeros_like(batch);
    evals.fill_(std::numeric_limits<double>::quiet_NaN());  // marks "not solved" below
  }
  const at::ScalarType out_dtype = factors[bucket[0]].scalar_type();
  evals = evals.clamp_min(0).to(out_dtype);
  evecs = evecs.to(out_dtype).contiguous();
  // Finite input gives finite vectors or a thrown error; NaN eigenvalues mark "not solved".
  const std::vector<bool> ok_h = to_host(finite.logical_and(finite_per_matrix(evals)));

  std::vector<size_t> retry;
  for (size_t k = 0; k < bucket.size(); ++k) {
    const size_t i = bucket[k];
    if (ok_h[k]) {
      out.eigenvalues[i] = own(evals, k);
      out.eigenvectors[i] = own(evecs, k);
      out.status[i] = static_cast<int32_t>(is_retry ? Status::kOkAfterFp64Retry : Status::kOk);
      continue;
    }
    out.eigenvalues[i] = at::zeros({factors[i].size(0)}, factors[i].options());
    out.eigenvectors[i] = at::zeros_like(factors[i]);
    if (!finite_h[k]) {
      out.status[i] = static_cast<int32_t>(Status::kNonFiniteInput);
    } else if (!is_retry && dtype == at::kFloat) {
      retry.push_back(i);
    } else {
      out.status[i] = static_cast<int32_t>(Status::kFailed);
    }
  }
  if (!retry.empty()) eigen_bucket(factors, retry, at::kDouble, true, out);
}

}  // namespace

void check_damped_inverse_args(at::TensorList factors, at::ArrayRef<double> damping) {
  constexpr std::string_view op = "damped_inverse";
  check_factors(op, factors);
  check_same_length(op, "damping", damping.size(), "factors", factors.size());
  for (size_t i = 0; i < damping.size(); ++i) check_finite_nonnegative(op, "damping", i, damping[i]);
}

void check_eigen_decompose_args(at::TensorList factors) {
  check_factors("eigen_decompose", factors);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> InverseResults::pack(
    const at::Device& device) const {
  return {inverses, status_tensor(status, device)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> EigenResults::pack(
    const at::Device& device) const {
  return {eigenvalues, eigenvectors, status_tensor(status, device)};
}

std::vector<size_t> all_indices(size_t n) {
  std::vector<size_t> indices(n);
  for (size_t i = 0; i < n; ++i) indices[i] = i;
  return indices;
}

std::vector<std::vector<size_t>> bucket_by_size(at::TensorList factors,
                                                const std::vector<size_t>& indices) {
  std::map<int64_t, std::vector<size_t>> by_size;
  for (size_t i : indices) by_size[factors[i].size(0)].push_back(i);
  std::vector<std::vector<size_t>> buckets;
  for (auto& [size, bucket] : by_size) buckets.push_back(std::move(bucket));
  return buckets;
}

void damped_inverse_aten(at::TensorList factors, at::ArrayRef<double> damping,
                         const std::vector<size_t>& indices, InverseResults& out) {
  for (const auto& bucket : bucket_by_size(factors, indices)) {
    invert_bucket(factors, damping, bucket, factors[bucket[0]].scalar_type(), false, out);
  }
}

void retry_damped_inverse_fp64(at::TensorList factors, at::ArrayRef<double> damping,
                               const std::vector<size_t>& indices, InverseResults& out) {
  for (const auto& bucket : bucket_by_size(factors, indices)) {
    invert_bucket(factors, damping, bucket, at::kDouble, true, out);
  }
}

void eigen_decompose_aten(at::TensorList factors, const std::vector<size_t>& indices,
                          EigenResults& out) {
  for (const auto& bucket : bucket_by_size(factors, indices)) {
    eigen_bucket(factors, bucket, factors[bucket[0]].scalar_type(), false, out);
  }
}

}  // namespace kfac
