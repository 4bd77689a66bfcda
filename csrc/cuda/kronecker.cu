// Kronecker-factored products on CUDA. The GEMMs go through ATen (cuBLAS, at the roofline for
// these shapes); the eigenbasis division T /= (lambda_G lambda_A^T + damping) runs for every
// layer of a call in ONE launch, in place, without materialising the denominator.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "aten/kronecker.h"
#include "cuda/layer_table.cuh"

namespace kfac::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kElementsPerThread = 4;
constexpr int64_t kElementsPerBlock = kThreads * kElementsPerThread;

struct DivideEntry {
  void* rotated;                // [rows, cols], divided in place
  const void* g_eigenvalues;    // [rows]
  const void* a_eigenvalues;    // [cols]
  int64_t rows;
  int64_t cols;
  int64_t first_block;
  double damping;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    divide_by_damped_eigenvalues_kernel(const DivideEntry* entries, int n_entries) {
  const DivideEntry e = entries[layer_of_block(entries, n_entries, blockIdx.x)];
  T* t = static_cast<T*>(e.rotated);
  const T* lg = static_cast<const T*>(e.g_eigenvalues);
  const T* la = static_cast<const T*>(e.a_eigenvalues);
  const auto gamma = static_cast<T>(e.damping);
  const int64_t begin = (blockIdx.x - e.first_block) * kElementsPerBlock + threadIdx.x;
  const int64_t count = e.rows * e.cols;
#pragma unroll
  for (int s = 0; s < kElementsPerThread; ++s) {
    const int64_t idx = begin + int64_t(s) * kThreads;
    if (idx < count) t[idx] /= lg[idx / e.cols] * la[idx % e.cols] + gamma;
  }
}

void divide_by_damped_eigenvalues(const std::vector<at::Tensor>& rotated,
                                  at::TensorList g_eigenvalues, at::TensorList a_eigenvalues,
                                  at::ArrayRef<double> damping) {
  std::vector<DivideEntry> entries;
  int64_t blocks = 0;
  for (size_t i = 0; i < rotated.size(); ++i) {
    TORCH_INTERNAL_ASSERT(rotated[i].is_contiguous(), "the kernel indexes rows x cols row-major");
    const int64_t count = rotated[i].numel();
    if (count == 0) continue;
    entries.push_back({rotated[i].data_ptr(), g_eigenvalues[i].data_ptr(),
                       a_eigenvalues[i].data_ptr(), rotated[i].size(0), rotated[i].size(1),
                       blocks, damping[i]});
    blocks += (count + kElementsPerBlock - 1) / kElementsPerBlock;
  }
  if (entries.empty()) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "precondition_eigen: ", blocks,
              " blocks exceed one launch's grid");
  const at::Tensor table = upload_table(entries, rotated[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rotated[0].scalar_type(), "precondition_eigen", [&] {
    divide_by_damped_eigenvalues_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        table_ptr<DivideEntry>(table), static_cast<int>(entries.size()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

std::vector<at::Tensor> kron_matmul(at::TensorList lefts, at::TensorList mats,
                                    at::TensorList rights) {
  check_kron_matmul_args(lefts, mats, rights);
  const c10::cuda::CUDAGuard guard(lefts[0].device());
  std::vector<at::Tensor> out;
  out.reserve(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) out.push_back(kron_matmul_one(lefts[i], mats[i], rights[i]));
  return out;
}

std::vector<at::Tensor> precondition_eigen(at::TensorList g_eigenvectors,
                                           at::TensorList g_eigenvalues, at::TensorList grads,
                                           at::TensorList a_eigenvectors,
                                           at::TensorList a_eigenvalues,
                                           at::ArrayRef<double> damping) {
  check_precondition_eigen_args(g_eigenvectors, g_eigenvalues, grads, a_eigenvectors,
                                a_eigenvalues, damping);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  std::vector<at::Tensor> rotated;
  rotated.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    rotated.push_back(to_eigenbasis(g_eigenvectors[i], grads[i], a_eigenvectors[i]));
  }
  divide_by_damped_eigenvalues(rotated, g_eigenvalues, a_eigenvalues, damping);
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    out.push_back(from_eigenbasis(g_eigenvectors[i], rotated[i], a_eigenvectors[i],
                                  grads[i].scalar_type()));
  }
  return out;
}

}  // namespace kfac::cuda

TORCH_LIBRARY_IMPL(kfac_ext, CUDA, m) {
  m.impl("kron_matmul", &kfac::cuda::kron_matmul);
  m.impl("precondition_eigen", &kfac::cuda::precondition_eigen);
}
