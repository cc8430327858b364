// One pool of worker threads for every parallel region of a forward; the calling thread works too.
//
// Items are claimed one at a time, so a slow core (a noisy neighbour) takes fewer of them, and which
// thread computes an item never changes its result. The caller waits only for items that have been
// claimed, never for a worker to wake up: on a shared, oversubscribed machine a descheduled worker
// costs at most the item it holds. A claim names its region (generation << 32 | item), so a worker
// that wakes late for an old region cannot take an item of the new one.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <immintrin.h>

namespace vs {

class Pool {
 public:
  ~Pool() { resize(1); }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  void resize(int n) {
    if (n < 1) n = 1;
    if (n == size()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    quit_ = false;
    for (int i = 1; i < n; i++) threads_.emplace_back([this, seen = generation_.load()] { loop(seen); });
  }

  // f(item) for item in [0, items), spread over the pool; returns when every item is done.
  void run(int items, const std::function<void(int)>& f) {
    if (threads_.empty() || items <= 1) {
      for (int i = 0; i < items; i++) f(i);
      return;
    }
    fn_ = &f;
    total_.store(items, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    uint64_t g;
    {
      std::lock_guard<std::mutex> lock(mu_);
      g = generation_.fetch_add(1) + 1;
      ticket_.store(g << 32, std::memory_order_release);
    }
    cv_.notify_all();
    work(g);
    while (done_.load(std::memory_order_acquire) < items) _mm_pause();
    // Close the region before the next one sets total_ and fn_: a worker still in work(g) must not
    // read a larger total beside this region's ticket, claim it and run the next region's function.
    ticket_.store(g << 32 | kClosed, std::memory_order_release);
  }

 private:
  // Workers spin this long after a region before sleeping: the regions of one forward follow each
  // other within microseconds, and the next forward comes after the engine's Python work for the
  // last one (about a millisecond). Waking a sleeping thread costs far more here: letting workers
  // sleep after 0.3 ms halved plain decoding (SmolLM2, 2 threads: 62 against 121 tok/s).
  static constexpr auto kSpin = std::chrono::microseconds(5000);
  static constexpr uint64_t kClosed = 0x7fffffff;  // an item past any region's last

  void work(uint64_t g) {
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      const uint32_t item = static_cast<uint32_t>(t);
      if (t >> 32 != g || item >= static_cast<uint32_t>(total_.load(std::memory_order_relaxed))) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      (*fn_)(static_cast<int>(item));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop(uint64_t seen) {
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; spins++) {
        _mm_pause();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return generation_.load() != seen; });
        }
      }
      if (quit_) return;
      seen = generation_.load(std::memory_order_acquire);
      work(seen);
    }
  }

  std::vector<std::thread> threads_;
  const std::function<void(int)>* fn_ = nullptr;
  // each on its own cache line: claims, completions and the wake-up signal must not bounce together
  alignas(64) std::atomic<int> total_{0};
  alignas(64) std::atomic<int> done_{0};
  alignas(64) std::atomic<uint64_t> ticket_{0};
  alignas(64) std::atomic<uint64_t> generation_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool quit_ = false;
};

}  // namespace vs
