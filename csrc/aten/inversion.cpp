#include "aten/inversion.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/all.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cholesky_inverse.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/matmul.h>
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

// Per matrix: every element finite. The smallest and largest elements are NaN or +-inf iff the
// matrix holds one: two vectorized reductions (isfinite + all take four passes; aminmax along a
// dim is 4-6x slower than amax + amin on CPU, measured).
at::Tensor finite_per_matrix(const at::Tensor& batch) {
  const at::Tensor flat = batch.flatten(1);
  return at::isfinite(at::amax(flat, 1)).logical_and_(at::isfinite(at::amin(flat, 1)));
}

// Matrices whose flag is unset are swapped for the identity before the next library call, so it
// never sees NaN (unspecified behaviour) or a failed factor (cholesky_inverse throws on a zero
// pivot and would lose the whole batch); their results are discarded anyway. On CUDA this is
// decided on the device (no read back); on CPU reading the flags is free, and the common case,
// every flag set, skips the pass.
at::Tensor identity_where_not(const at::Tensor& batch, const at::Tensor& keep) {
  if (batch.is_cpu() && keep.all().item<bool>()) return batch;
  const at::Tensor eye = at::eye(batch.size(-1), batch.options());
  return at::where(keep.view({-1, 1, 1}), batch, eye);
}

// Adds damping[bucket[k]] to the diagonal of matrix k: one launch when the bucket shares one
// value (Tikhonov damping), one per matrix otherwise; never a host-to-device copy.
void add_damping(const at::Tensor& batch, at::ArrayRef<double> damping,
                 const std::vector<size_t>& bucket) {
  const bool shared = std::all_of(bucket.begin(), bucket.end(),
                                  [&](size_t i) { return damping[i] == damping[bucket[0]]; });
  if (shared) {
    batch.diagonal(0, -2, -1).add_(damping[bucket[0]]);
    return;
  }
  for (size_t k = 0; k < bucket.size(); ++k) {
    batch[static_cast<int64_t>(k)].diagonal().add_(damping[bucket[k]]);
  }
}

// (L L^T)^-1 from the lower Cholesky factor, exactly symmetric and row-major. On CPU,
// cholesky_inverse (LAPACK potri) mirrors one computed triangle, so its column-major result read
// transposed is the row-major matrix itself. On CUDA, cholesky_inverse reads its status back to
// the host (a synchronization); a batched triangular solve and a GEMM do the same without one,
// and the product is averaged with its transpose for exact symmetry.
at::Tensor inverse_from_cholesky(const at::Tensor& chol) {
  if (chol.is_cpu()) return at::cholesky_inverse(chol).mT().contiguous();
  const at::Tensor eye = at::eye(chol.size(-1), chol.options()).expand_as(chol);
  const at::Tensor l_inv = at::linalg_solve_triangular(chol, eye, /*upper=*/false);
  const at::Tensor product = at::matmul(l_inv.mT(), l_inv);
  return (product + product.mT()).mul_(0.5);
}

// Results are slices of one batch; outputs must not alias each other, so slices get their own
// storage when the batch holds more than one.
at::Tensor own(const at::Tensor& batch, int64_t k) {
  return batch.size(0) == 1 ? batch[k] : batch[k].clone();
}

PendingBucket enqueue_inverse(at::TensorList factors, at::ArrayRef<double> damping,
                              const std::vector<size_t>& bucket, at::ScalarType dtype) {
  const at::Tensor batch = stack_symmetrized(factors, bucket, dtype);
  const at::Tensor finite = finite_per_matrix(batch);
  const at::Tensor damped = identity_where_not(batch, finite);
  add_damping(damped, damping, bucket);
  const auto [chol_raw, info] = at::linalg_cholesky_ex(damped);
  // A pivot that overflowed (inf) passes LAPACK's check; it shows on the diagonal.
  const at::Tensor factored =
      info.eq(0).logical_and(at::isfinite(chol_raw.diagonal(0, -2, -1)).all(-1));
  // In the factors' dtype: a float64 retry may overflow float32 in the cast, which the ok flag
  // catches.
  const at::Tensor inv = inverse_from_cholesky(identity_where_not(chol_raw, factored))
                             .to(factors[bucket[0]].scalar_type());
  const at::Tensor ok = finite.logical_and(factored).logical_and(finite_per_matrix(inv));
  return {bucket, finite, ok, at::Tensor(), inv, false};
}

PendingBucket enqueue_eigen(at::TensorList factors, const std::vector<size_t>& bucket,
                            at::ScalarType dtype) {
  const at::Tensor batch = stack_symmetrized(factors, bucket, dtype);
  const at::Tensor finite = finite_per_matrix(batch);
  at::Tensor evals, evecs;
  try {
    // linalg_eigh checks convergence on the host (a synchronization per bucket on CUDA).
    std::tie(evals, evecs) = at::linalg_eigh(identity_where_not(batch, finite));
  } catch (const c10::LinAlgError&) {
    // Non-convergence is reported for the whole batch: the bucket is solved again matrix by
    // matrix, so that one bad factor does not fail its neighbours.
    const at::Tensor none = at::zeros({static_cast<int64_t>(bucket.size())}, finite.options());
    return {bucket, finite, none, at::Tensor(), at::Tensor(), bucket.size() > 1};
  }
  const at::ScalarType out_dtype = factors[bucket[0]].scalar_type();
  evals = evals.clamp_min(0).to(out_dtype);
  evecs = evecs.to(out_dtype).contiguous();
  const at::Tensor ok = finite.logical_and(finite_per_matrix(evals));
  return {bucket, finite, ok, evals, evecs, false};
}

// The status of a factor whose result is unusable, or -1 when it is to be retried in float64.
int32_t failure_status(bool finite, bool is_retry, at::ScalarType dtype) {
  if (!finite) return static_cast<int32_t>(Status::kNonFiniteInput);
  if (!is_retry && dtype == at::kFloat) return -1;
  return static_cast<int32_t>(Status::kFailed);
}

int32_t success_status(bool is_retry) {
  return static_cast<int32_t>(is_retry ? Status::kOkAfterFp64Retry : Status::kOk);
}

void run_eigen(at::TensorList factors, const std::vector<std::vector<size_t>>& buckets,
               at::ScalarType dtype, bool is_retry, EigenResults& out) {
  std::vector<PendingBucket> pending;
  for (const auto& bucket : buckets) pending.push_back(enqueue_eigen(factors, bucket, dtype));
  const std::vector<std::vector<int32_t>> flags = read_back(flags_of(pending));
  std::vector<size_t> retry;
  for (size_t b = 0; b < pending.size(); ++b) {
    const PendingBucket& p = pending[b];
    if (p.split) {
      for (size_t i : p.bucket) run_eigen(factors, {{i}}, dtype, is_retry, out);
      continue;
    }
    const std::vector<int32_t>&finite = flags[2 * b], &ok = flags[2 * b + 1];
    for (size_t k = 0; k < p.bucket.size(); ++k) {
      const size_t i = p.bucket[k];
      if (ok[k]) {
        out.eigenvalues[i] = own(p.values, static_cast<int64_t>(k));
        out.eigenvectors[i] = own(p.vectors, static_cast<int64_t>(k));
        out.status[i] = success_status(is_retry);
        continue;
      }
      out.eigenvalues[i] = at::zeros({factors[i].size(0)}, factors[i].options());
      out.eigenvectors[i] = at::zeros_like(factors[i]);
      const int32_t status = failure_status(finite[k], is_retry, dtype);
      if (status < 0) retry.push_back(i);
      else out.status[i] = status;
    }
  }
  if (!retry.empty()) run_eigen(factors, bucket_by_size(factors, retry), at::kDouble, true, out);
}

}  // namespace

std::vector<at::Tensor> flags_of(const std::vector<PendingBucket>& pending) {
  std::vector<at::Tensor> flags;
  for (const PendingBucket& p : pending) {
    flags.push_back(p.finite);
    flags.push_back(p.ok);
  }
  return flags;
}

std::vector<std::vector<int32_t>> read_back(const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) return {};
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : tensors) flat.push_back(t.reshape(-1).to(at::kInt));
  const at::Tensor host = at::cat(flat).to(at::kCPU).contiguous();
  const int32_t* p = host.data_ptr<int32_t>();
  std::vector<std::vector<int32_t>> out;
  for (const at::Tensor& t : flat) {
    out.emplace_back(p, p + t.numel());
    p += t.numel();
  }
  return out;
}

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

std::vector<PendingBucket> enqueue_damped_inverse(at::TensorList factors,
                                                  at::ArrayRef<double> damping,
                                                  const std::vector<size_t>& indices,
                                                  at::ScalarType dtype) {
  std::vector<PendingBucket> pending;
  for (const auto& bucket : bucket_by_size(factors, indices)) {
    pending.push_back(enqueue_inverse(factors, damping, bucket, dtype));
  }
  return pending;
}

void finish_damped_inverse(at::TensorList factors, at::ArrayRef<double> damping,
                           const std::vector<PendingBucket>& pending,
                           const std::vector<std::vector<int32_t>>& flags, bool is_retry,
                           InverseResults& out) {
  std::vector<size_t> retry;
  for (size_t b = 0; b < pending.size(); ++b) {
    const PendingBucket& p = pending[b];
    const std::vector<int32_t>&finite = flags[2 * b], &ok = flags[2 * b + 1];
    for (size_t k = 0; k < p.bucket.size(); ++k) {
      const size_t i = p.bucket[k];
      if (ok[k]) {
        out.inverses[i] = own(p.vectors, static_cast<int64_t>(k));
        out.status[i] = success_status(is_retry);
        continue;
      }
      out.inverses[i] = at::zeros_like(factors[i]);
      const int32_t status = failure_status(finite[k], is_retry, factors[i].scalar_type());
      if (status < 0) retry.push_back(i);
      else out.status[i] = status;
    }
  }
  if (!retry.empty()) retry_damped_inverse_fp64(factors, damping, retry, out);
}

void damped_inverse_aten(at::TensorList factors, at::ArrayRef<double> damping,
                         const std::vector<size_t>& indices, InverseResults& out) {
  const auto pending = enqueue_damped_inverse(factors, damping, indices, factors[0].scalar_type());
  finish_damped_inverse(factors, damping, pending, read_back(flags_of(pending)), false, out);
}

void retry_damped_inverse_fp64(at::TensorList factors, at::ArrayRef<double> damping,
                               const std::vector<size_t>& indices, InverseResults& out) {
  const auto pending = enqueue_damped_inverse(factors, damping, indices, at::kDouble);
  finish_damped_inverse(factors, damping, pending, read_back(flags_of(pending)), true, out);
}

void eigen_decompose_aten(at::TensorList factors, const std::vector<size_t>& indices,
                          EigenResults& out) {
  run_eigen(factors, bucket_by_size(factors, indices), factors[0].scalar_type(), false, out);
}

}  // namespace kfac
