// Many layers, one launch (the apex multi_tensor_apply idea): the host packs one plain struct per
// layer into a table passed BY VALUE as a __grid_constant__ kernel parameter, and each thread
// block finds its layer by binary search over the entries' first_block. No host buffer and no
// host-to-device copy per call, so launches are asynchronous and safe to capture in a CUDA graph.
// A call with more layers than one table holds launches once per chunk of kTableBytes.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

namespace kfac::cuda {

// Kernel parameters are limited to 4 KB on every architecture and CUDA version we build for.
constexpr size_t kTableBytes = 3840;

template <typename Entry>
struct LayerTable {
  static_assert(std::is_trivially_copyable_v<Entry>, "table entries are copied as bytes");
  static constexpr int kCapacity = static_cast<int>(kTableBytes / sizeof(Entry));
  Entry entries[kCapacity];
  int size;
};

// Calls launch(table, blocks) once per chunk of at most LayerTable::kCapacity entries; each
// entry's first_block is set relative to its chunk from blocks_of(entry), the number of thread
// blocks the entry needs (entries needing none are dropped).
template <typename Entry, typename BlocksOf, typename Launch>
void launch_in_chunks(const std::vector<Entry>& entries, const BlocksOf& blocks_of,
                      const Launch& launch) {
  LayerTable<Entry> table{};
  int64_t blocks = 0;
  for (const Entry& entry : entries) {
    const int64_t need = blocks_of(entry);
    if (need == 0) continue;
    if (table.size == LayerTable<Entry>::kCapacity) {
      launch(table, blocks);
      table.size = 0;
      blocks = 0;
    }
    table.entries[table.size] = entry;
    table.entries[table.size].first_block = blocks;
    ++table.size;
    blocks += need;
  }
  if (table.size > 0) launch(table, blocks);
}

// Index of the entry whose [first_block, next first_block) range holds `block`.
template <typename Entry>
__device__ inline int layer_of_block(const LayerTable<Entry>& table, int64_t block) {
  int lo = 0, hi = table.size - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.entries[mid].first_block <= block) {
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
