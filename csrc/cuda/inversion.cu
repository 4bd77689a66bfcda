// Damped Cholesky inverse and eigendecomposition on CUDA.
// Small factors (n <= kMaxSmall): one thread block per matrix, the matrix in shared memory;
// symmetrize + damping on load, right-looking Cholesky, then each thread solves L L^T x = e_j for
// its columns. All small factors of a call go in one launch (the table passed by value). Larger
// factors and every eigendecomposition go through ATen (cuSOLVER), one batched call per factor
// size. Everything is enqueued first and the statuses of the whole call are read back in one
// copy: one synchronization per call (plus the float64 retry of float32 failures, exactly as on
// CPU, and one per size bucket inside ATen's eigh). Reading statuses back cannot happen inside a
// CUDA graph capture, so both ops refuse to run under capture.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string_view>

#include "aten/inversion.h"
#include "cuda/layer_table.cuh"

namespace kfac::cuda {

namespace {

constexpr int kMaxSmall = 64;
constexpr int kThreads = 128;

struct CholeskyEntry {
  const void* factor;  // [n, n]
  void* inverse;       // [n, n], written: inverse, or zeros on failure
  int32_t* status;     // this factor's status
  int64_t n;
  int64_t first_block;  // == its index in the table: one block per factor
  double damping;
};

constexpr int32_t code(Status s) { return static_cast<int32_t>(s); }

template <typename T>
__device__ void fill_zero(T* out, int64_t count) {
  for (int64_t idx = threadIdx.x; idx < count; idx += blockDim.x) out[idx] = T(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    damped_cholesky_inverse_kernel(const __grid_constant__ LayerTable<CholeskyEntry> table) {
  __shared__ T a[kMaxSmall][kMaxSmall + 1];  // +1: column walks hit distinct banks
  __shared__ int not_positive_definite;
  const CholeskyEntry& e = table.entries[blockIdx.x];
  const int n = static_cast<int>(e.n), tid = threadIdx.x;
  const T* f = static_cast<const T*>(e.factor);
  T* inv = static_cast<T*>(e.inverse);

  bool non_finite = false;
  for (int idx = tid; idx < n * n; idx += kThreads) {
    const int i = idx / n, j = idx % n;
    const T v = (f[i * n + j] + f[j * n + i]) * T(0.5);
    non_finite |= !isfinite(v);
    a[i][j] = v + (i == j ? static_cast<T>(e.damping) : T(0));
  }
  if (tid == 0) not_positive_definite = 0;
  if (__syncthreads_or(non_finite)) {
    fill_zero(inv, int64_t(n) * n);
    if (tid == 0) *e.status = code(Status::kNonFiniteInput);
    return;
  }

  // Right-looking Cholesky, lower triangle in place.
  for (int k = 0; k < n; ++k) {
    if (tid == 0) {
      const T pivot = a[k][k];
      if (pivot > T(0) && isfinite(pivot)) {
        a[k][k] = sqrt(pivot);
      } else {
        not_positive_definite = 1;
      }
    }
    __syncthreads();
    if (not_positive_definite) break;
    const T diag = a[k][k];
    for (int i = k + 1 + tid; i < n; i += kThreads) a[i][k] /= diag;
    __syncthreads();
    const int m = n - k - 1;
    for (int idx = tid; idx < m * m; idx += kThreads) {
      const int i = k + 1 + idx / m, j = k + 1 + idx % m;
      if (j <= i) a[i][j] -= a[i][k] * a[j][k];
    }
    __syncthreads();
  }
  if (not_positive_definite) {
    fill_zero(inv, int64_t(n) * n);
    if (tid == 0) *e.status = code(Status::kFailed);
    return;
  }

  // Column j of the inverse (= row j, by symmetry): forward L y = e_j, then back L^T x = y.
  for (int j = tid; j < n; j += kThreads) {
    T* x = inv + int64_t(j) * n;
    for (int i = 0; i < j; ++i) x[i] = T(0);
    for (int i = j; i < n; ++i) {
      T s = i == j ? T(1) : T(0);
      for (int k = j; k < i; ++k) s -= a[i][k] * x[k];
      x[i] = s / a[i][i];
    }
    for (int i = n - 1; i >= 0; --i) {
      T s = x[i];
      for (int k = i + 1; k < n; ++k) s -= a[k][i] * x[k];
      x[i] = s / a[i][i];
    }
  }
  __syncthreads();
  // Exactly symmetric: each pair averaged by one thread.
  for (int idx = tid; idx < n * n; idx += kThreads) {
    const int i = idx / n, j = idx % n;
    if (i < j) {
      const T v = (inv[i * n + j] + inv[j * n + i]) * T(0.5);
      inv[i * n + j] = v;
      inv[j * n + i] = v;
    }
  }
  __syncthreads();
  bool overflow = false;
  for (int idx = tid; idx < n * n; idx += kThreads) overflow |= !isfinite(inv[idx]);
  if (__syncthreads_or(overflow)) {
    fill_zero(inv, int64_t(n) * n);
    if (tid == 0) *e.status = code(Status::kFailed);
    return;
  }
  if (tid == 0) *e.status = code(Status::kOk);
}

// Enqueues the small-matrix kernel on factors[indices]; returns their statuses (device int32,
// in `indices` order), read back later with everything else of the call.
at::Tensor enqueue_damped_inverse_small(at::TensorList factors, at::ArrayRef<double> damping,
                                        const std::vector<size_t>& indices, InverseResults& out) {
  const at::Tensor status = at::empty({static_cast<int64_t>(indices.size())},
                                      factors[0].options().dtype(at::kInt));
  std::vector<CholeskyEntry> entries;
  for (size_t k = 0; k < indices.size(); ++k) {
    const size_t i = indices[k];
    out.inverses[i] = at::empty_like(factors[i]);
    entries.push_back({factors[i].data_ptr(), out.inverses[i].data_ptr(),
                       status.data_ptr<int32_t>() + k, factors[i].size(0), 0, damping[i]});
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(factors[0].scalar_type(), "damped_inverse", [&] {
    launch_in_chunks(entries, [](const CholeskyEntry&) { return int64_t(1); },
                     [&](const LayerTable<CholeskyEntry>& table, int64_t blocks) {
                       damped_cholesky_inverse_kernel<scalar_t>
                           <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table);
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                     });
  });
  return status;
}

void refuse_capture(std::string_view op) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
              ": cannot run while a CUDA graph is being captured: it reads each factor's status "
              "back to the host (to retry failures in float64). Invert outside the captured "
              "region; only steps that update no inverses are capturable");
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> damped_inverse(at::TensorList factors,
                                                               at::ArrayRef<double> damping) {
  check_damped_inverse_args(factors, damping);
  const c10::cuda::CUDAGuard guard(factors[0].device());
  refuse_capture("damped_inverse");
  InverseResults out(factors.size());
  std::vector<size_t> small, large;
  for (size_t i = 0; i < factors.size(); ++i) {
    (factors[i].size(0) <= kMaxSmall ? small : large).push_back(i);
  }
  // Everything enqueued before the one read back.
  std::vector<at::Tensor> to_read;
  if (!small.empty()) to_read.push_back(enqueue_damped_inverse_small(factors, damping, small, out));
  const std::vector<PendingBucket> pending =
      enqueue_damped_inverse(factors, damping, large, factors[0].scalar_type());
  for (const at::Tensor& flag : flags_of(pending)) to_read.push_back(flag);
  std::vector<std::vector<int32_t>> host = read_back(to_read);

  if (!small.empty()) {
    std::vector<size_t> retry;
    const bool retryable = factors[0].scalar_type() == at::kFloat;
    for (size_t k = 0; k < small.size(); ++k) {
      out.status[small[k]] = host[0][k];
      if (host[0][k] == code(Status::kFailed) && retryable) retry.push_back(small[k]);
    }
    host.erase(host.begin());
    if (!retry.empty()) retry_damped_inverse_fp64(factors, damping, retry, out);
  }
  finish_damped_inverse(factors, damping, pending, host, false, out);
  return out.pack(factors[0].device());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> eigen_decompose(
    at::TensorList factors) {
  check_eigen_decompose_args(factors);
  const c10::cuda::CUDAGuard guard(factors[0].device());
  refuse_capture("eigen_decompose");
  EigenResults out(factors.size());
  eigen_decompose_aten(factors, all_indices(factors.size()), out);
  return out.pack(factors[0].device());
}

}  // namespace kfac::cuda

TORCH_LIBRARY_IMPL(kfac_ext, CUDA, m) {
  m.impl("damped_inverse", &kfac::cuda::damped_inverse);
  m.impl("eigen_decompose", &kfac::cuda::eigen_decompose);
}
