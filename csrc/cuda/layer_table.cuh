// Many layers, one launch (the apex multi_tensor_apply idea): the host packs one plain struct per
// layer into a table, uploads it once, and each thread block finds its layer by binary search
// over the entries' first_block. Entries carry pointers, sizes and scalars only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace kfac::cuda {

// Copies the host table to `device` on the current stream, through pinned memory so the copy is
// asynchronous (torch's host allocator keeps the pinned block alive until the copy completes).
// The returned tensor owns the device copy; keep it alive until the kernel is enqueued.
template <typename Entry>
at::Tensor upload_table(const std::vector<Entry>& entries, const at::Device& device) {
  static_assert(std::is_trivially_copyable_v<Entry>, "table entries are copied as bytes");
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(Entry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}

template <typename Entry>
const Entry* table_ptr(const at::Tensor& table) {
  return reinterpret_cast<const Entry*>(table.data_ptr());
}

// Index of the entry whose [first_block, next first_block) range holds `block`.
template <typename Entry>
__device__ inline int layer_of_block(const Entry* entries, int n_entries, int64_t block) {
  int lo = 0, hi = n_entries - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (entries[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Converts an input element to the accumulation type; c10::Half / c10::BFloat16 go through float.
template <typename acc_t, typename in_t>
__device__ inline acc_t to_acc(in_t v) {
  if constexpr (std::is_same_v<in_t, double> || std::is_same_v<in_t, float>) {
    return static_cast<acc_t>(v);
  } else {
    return static_cast<acc_t>(static_cast<float>(v));
  }
}

}  // namespace kfac::cuda
