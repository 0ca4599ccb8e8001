#pragma once
// Work shared with stealing: each thread starts on its own contiguous share of a range, as a static split would give
// it, and a thread that finishes early takes items from the end of the share with the most left. On a shared
// machine one core at a time is often slowed for tens of milliseconds — on this project's VMs a neighbour's vector
// work slows a core's AMX up to 5x and its AVX-512 up to 2x, never both cores at once (a per-core monitor,
// docs/performance.md) — and with fixed shares the other core waits for it at the end of every parallel region.
// Which thread runs an item never changes what the item computes. A share's front and back sit in one atomic word
// on a cache line of its own: its owner's claims stay local until a thief comes (a shared counter that both threads
// hit on every claim cost 2-9% on a decoder's linears).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace pyengine {

struct alignas(64) Share {  // items [front, back) not yet taken: front in the low 32 bits, back in the high
  std::atomic<uint64_t> range{0};
  static uint64_t pack(uint64_t front, uint64_t back) { return back << 32 | front; }
};

// One thread's view of a range shared by stealing (or, built from begin and end, a range of its own).
class Claims {
 public:
  Claims(int64_t begin, int64_t end) : own_(&single_), shares_(&single_), count_(1) {
    single_.range.store(Share::pack(begin, end), std::memory_order_relaxed);
  }
  Claims(Share* shares, int count, int me) : own_(shares + me), shares_(shares), count_(count) {}
  Claims(const Claims&) = delete;  // a fixed range points into itself
  Claims& operator=(const Claims&) = delete;

  // The thread's next item: its own share's front, else one stolen from the back of the fullest other share.
  bool next(int64_t& item) {
    if (take(*own_, false, item)) return true;
    for (;;) {
      Share* victim = nullptr;
      uint64_t most = 0;
      for (int s = 0; s < count_; ++s) {
        const uint64_t left = remaining(shares_[s].range.load(std::memory_order_relaxed));
        if (left > most) most = left, victim = shares_ + s;
      }
      if (victim == nullptr) return false;
      if (take(*victim, true, item)) return true;
    }
  }
  // The item after the last one `next` gave from the thread's own share, while that share holds it (a thief may
  // still take it: a hint for prefetching, no more); -1 otherwise.
  int64_t upcoming() const {
    const uint64_t r = own_->range.load(std::memory_order_relaxed);
    return remaining(r) > 0 ? static_cast<int64_t>(r & 0xffffffffu) : -1;
  }

 private:
  static uint64_t remaining(uint64_t r) {
    const uint64_t front = r & 0xffffffffu, back = r >> 32;
    return back > front ? back - front : 0;
  }
  static bool take(Share& share, bool from_back, int64_t& item) {
    uint64_t r = share.range.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = r & 0xffffffffu, back = r >> 32;
      if (front >= back) return false;
      const uint64_t after = from_back ? Share::pack(front, back - 1) : Share::pack(front + 1, back);
      if (share.range.compare_exchange_weak(r, after, std::memory_order_relaxed)) {
        item = static_cast<int64_t>(from_back ? back - 1 : front);
        return true;
      }
    }
  }
  Share single_;
  Share* own_;
  Share* shares_;
  int count_;
};

// fn(Claims&) on each thread over [0, n), each starting on an equal contiguous share; one thread (or a call inside a
// parallel region) gets the whole range.
template <typename F>
void parallel_claims(int64_t n, const F& fn) {
  if (n <= 0) return;
  TORCH_CHECK(n < (int64_t{1} << 32), "parallel_claims: a range of fewer than 2^32 items");
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n));
  if (threads <= 1 || at::in_parallel_region()) {
    Claims all(0, n);
    return fn(all);
  }
  std::vector<Share> shares(threads);
  for (int t = 0; t < threads; ++t) shares[t].range.store(Share::pack(n * t / threads, n * (t + 1) / threads));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Claims mine(shares.data(), threads, static_cast<int>(t));
      fn(mine);
    }
  });
}

}  // namespace pyengine
