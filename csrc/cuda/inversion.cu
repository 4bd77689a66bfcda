// Damped Cholesky inverse and eigendecomposition on CUDA.
// Small factors (n <= kMaxSmall): one thread block per matrix, the matrix in shared memory;
// symmetrize + damping on load, right-looking Cholesky, then each thread solves L L^T x = e_j for
// its columns. All small factors of a call go in one launch. Float32 failures are retried in
// float64 through the ATen path, exactly as on CPU. Larger factors and every eigendecomposition
// go through ATen (cuSOLVER), one batched call per factor size.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "aten/inversion.h"
#include "cuda/layer_table.cuh"

namespace kfac::cuda {

namespace {

constexpr int kMaxSmall = 64;
constexpr int kThreads = 128;

struct CholeskyEntry {
  const void* factor;  // [n, n]
  void* inverse;       // [n, n], written: inverse, or zeros on failure
  int64_t n;
  double damping;
};

constexpr int32_t code(Status s) { return static_cast<int32_t>(s); }

template <typename T>
__device__ void fill_zero(T* out, int64_t count) {
  for (int64_t idx = threadIdx.x; idx < count; idx += blockDim.x) out[idx] = T(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    damped_cholesky_inverse_kernel(const CholeskyEntry* entries, int32_t* status) {
  __shared__ T a[kMaxSmall][kMaxSmall + 1];  // +1: column walks hit distinct banks
  __shared__ int not_positive_definite;
  const CholeskyEntry e = entries[blockIdx.x];
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
    if (tid == 0) status[blockIdx.x] = code(Status::kNonFiniteInput);
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
    if (tid == 0) status[blockIdx.x] = code(Status::kFailed);
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
    if (tid == 0) status[blockIdx.x] = code(Status::kFailed);
    return;
  }
  if (tid == 0) status[blockIdx.x] = code(Status::kOk);
}

// Runs the small-matrix kernel on factors[indices] and returns the per-factor status on the host.
std::vector<int32_t> damped_inverse_small(at::TensorList factors, at::ArrayRef<double> damping,
                                          const std::vector<size_t>& indices,
                                          InverseResults& out) {
  std::vector<CholeskyEntry> entries;
  for (size_t i : indices) {
    out.inverses[i] = at::empty_like(factors[i]);
    entries.push_back({factors[i].data_ptr(), out.inverses[i].data_ptr(), factors[i].size(0),
                       damping[i]});
  }
  const at::Tensor table = upload_table(entries, factors[0].device());
  const at::Tensor status = at::empty({static_cast<int64_t>(entries.size())},
                                      factors[0].options().dtype(at::kInt));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(factors[0].scalar_type(), "damped_inverse", [&] {
    damped_cholesky_inverse_kernel<scalar_t>
        <<<static_cast<unsigned>(entries.size()), kThreads, 0, stream>>>(
            table_ptr<CholeskyEntry>(table), status.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor host = status.cpu();  // synchronizes: retries are decided on the host
  const int32_t* p = host.data_ptr<int32_t>();
  return std::vector<int32_t>(p, p + host.numel());
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> damped_inverse(at::TensorList factors,
                                                               at::ArrayRef<double> damping) {
  check_damped_inverse_args(factors, damping);
  const c10::cuda::CUDAGuard guard(factors[0].device());
  InverseResults out(factors.size());
  std::vector<size_t> small, large;
  for (size_t i = 0; i < factors.size(); ++i) {
    (factors[i].size(0) <= kMaxSmall ? small : large).push_back(i);
  }
  if (!small.empty()) {
    const std::vector<int32_t> status = damped_inverse_small(factors, damping, small, out);
    std::vector<size_t> retry;
    for (size_t k = 0; k < small.size(); ++k) {
      out.status[small[k]] = status[k];
      const bool retryable = factors[0].scalar_type() == at::kFloat;
      if (status[k] == code(Status::kFailed) && retryable) retry.push_back(small[k]);
    }
    if (!retry.empty()) retry_damped_inverse_fp64(factors, damping, retry, out);
  }
  if (!large.empty()) damped_inverse_aten(factors, damping, large, out);
  return out.pack(factors[0].device());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> eigen_decompose(
    at::TensorList factors) {
  check_eigen_decompose_args(factors);
  const c10::cuda::CUDAGuard guard(factors[0].device());
  EigenResults out(factors.size());
  eigen_decompose_aten(factors, all_indices(factors.size()), out);
  return out.pack(factors[0].device());
}

}  // namespace kfac::cuda

TORCH_LIBRARY_IMPL(kfac_ext, CUDA, m) {
  m.impl("damped_inverse", &kfac::cuda::damped_inverse);
  m.impl("eigen_decompose", &kfac::cuda::eigen_decompose);
}
