// Damped Cholesky inverse and eigendecomposition of symmetric factors. Host-side pieces shared by
// the CPU and CUDA implementations: status codes, argument checks, and the size-bucketed paths
// over ATen (LAPACK on CPU, cuSOLVER on CUDA) with their float64 retry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace kfac {

// Per-factor outcome, mirrored by kfac_ext.ops.Status. A factor whose status is kFailed or
// kNonFiniteInput gets an all-zero result (zero, not NaN: a caller that forgets the status
// still cannot push NaN into its parameters).
enum class Status : int32_t {
  kOk = 0,
  kOkAfterFp64Retry = 1,  // float32 failed, float64 succeeded; the result is cast back
  kFailed = 2,            // not positive definite / eigensolver did not converge, even in fp64
  kNonFiniteInput = 3,    // the factor held NaN or inf
};

void check_damped_inverse_args(at::TensorList factors, at::ArrayRef<double> damping);
void check_eigen_decompose_args(at::TensorList factors);

// Outputs of one call, filled index by index (so a CUDA kernel and the ATen path can each fill
// their share) and packed at the end.
struct InverseResults {
  std::vector<at::Tensor> inverses;
  std::vector<int32_t> status;
  explicit InverseResults(size_t n) : inverses(n), status(n, 0) {}
  std::tuple<std::vector<at::Tensor>, at::Tensor> pack(const at::Device& device) const;
};

struct EigenResults {
  std::vector<at::Tensor> eigenvalues;
  std::vector<at::Tensor> eigenvectors;
  std::vector<int32_t> status;
  explicit EigenResults(size_t n) : eigenvalues(n), eigenvectors(n), status(n, 0) {}
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> pack(
      const at::Device& device) const;
};

// One size bucket's device work, enqueued without reading anything back: per matrix, whether
// the input was finite and whether the result is usable. The flags of every bucket of a call
// are read back together (read_back), so a call synchronizes once, not once per bucket.
struct PendingBucket {
  std::vector<size_t> bucket;
  at::Tensor finite, ok;
  at::Tensor values, vectors;  // eigenvalues and eigenvectors, or (vectors) the inverses
  bool split;                  // eigen only: the batch did not converge, solve one by one
};

// The flags of `pending`, in read_back order: finite, ok, finite, ok, ...
std::vector<at::Tensor> flags_of(const std::vector<PendingBucket>& pending);

// Every tensor's elements as int32 on the host, in ONE device-to-host copy.
std::vector<std::vector<int32_t>> read_back(const std::vector<at::Tensor>& tensors);

// Groups factor indices by matrix size, so same-size factors go through one batched call.
std::vector<std::vector<size_t>> bucket_by_size(at::TensorList factors,
                                                const std::vector<size_t>& indices);

// (F + damping I)^-1 for factors[indices], in `dtype`, through batched ATen Cholesky (cuSOLVER
// on CUDA; no host read), one bucket per size.
std::vector<PendingBucket> enqueue_damped_inverse(at::TensorList factors,
                                                  at::ArrayRef<double> damping,
                                                  const std::vector<size_t>& indices,
                                                  at::ScalarType dtype);

// Fills `out` from enqueued buckets and their flags (read_back of flags_of(pending)); float32
// failures are retried in float64.
void finish_damped_inverse(at::TensorList factors, at::ArrayRef<double> damping,
                           const std::vector<PendingBucket>& pending,
                           const std::vector<std::vector<int32_t>>& flags, bool is_retry,
                           InverseResults& out);

// Both of the above with one read back: (F + damping I)^-1 for factors[indices].
void damped_inverse_aten(at::TensorList factors, at::ArrayRef<double> damping,
                         const std::vector<size_t>& indices, InverseResults& out);

// Float64 retry of the listed float32 factors, whose first attempt failed; results are cast back
// to float32 and marked kOkAfterFp64Retry, or kFailed.
void retry_damped_inverse_fp64(at::TensorList factors, at::ArrayRef<double> damping,
                               const std::vector<size_t>& indices, InverseResults& out);

// Eigendecomposition of factors[indices] through batched ATen eigh, float32 failures retried in
// float64, eigenvalues clamped at 0. ATen's eigh reads its convergence status back per bucket;
// the finite flags of all buckets are read once more, together.
void eigen_decompose_aten(at::TensorList factors, const std::vector<size_t>& indices,
                          EigenResults& out);

std::vector<size_t> all_indices(size_t n);

}  // namespace kfac
