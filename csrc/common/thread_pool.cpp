#include "common/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace r3mes {

constexpr std::chrono::microseconds kSpinBeforeSleep{2000};

static inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

namespace {
constexpr int kBits = 20;
constexpr std::uint64_t kFieldMask = (std::uint64_t{1} << kBits) - 1;
}  // namespace

void ThreadPool::drain() {
  std::uint64_t w = work_.load(std::memory_order_acquire);
  for (;;) {
    const std::uint64_t next = w & kFieldMask;
    const std::uint64_t tasks = (w >> kBits) & kFieldMask;
    if (next >= tasks) return;
    if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                     std::memory_order_acquire))
      continue;  // w now holds the current word; re-check it
    (*fn_)(static_cast<std::size_t>(next));
    done_tasks_.fetch_add(1, std::memory_order_release);
    w = work_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_loop() {
  // Generation 0 is the pool's birth; reading the counter here instead would
  // race with a run() that starts before this thread does, and miss it.
  unsigned long seen = 0;
  for (;;) {
    // Spin first. In a decode step the next kernel call follows after the framework
    // work between layers (tens to hundreds of microseconds); a worker that went to
    // sleep meanwhile wakes too late to help, and the call runs on one thread. Measured
    // on the 2B-shaped model, 2 threads: spinning ~0.1 ms gave 71 ms a token, 2 ms gives
    // 54 ms (5 ms: no better). After that the worker sleeps: an idle process costs nothing.
    const auto spin_until = std::chrono::steady_clock::now() + kSpinBeforeSleep;
    for (unsigned i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
      cpu_relax();
      if ((i & 255) == 0) {
        if (std::chrono::steady_clock::now() > spin_until) break;
        // Let a runnable thread of the process (a server thread taking a new request while
        // decode holds every core) have this core now; with none, this returns at once.
        std::this_thread::yield();
      }
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_) return;
    drain();
  }
}

void ThreadPool::run(std::size_t num_tasks, const std::function<void(std::size_t)>& fn) {
  if (num_tasks == 0) return;
  if (workers_.empty() || num_tasks == 1) {
    for (std::size_t i = 0; i < num_tasks; ++i) fn(i);
    return;
  }
  if (num_tasks > kMaxTasks) throw std::invalid_argument("ThreadPool::run: too many tasks");
  unsigned long gen;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    gen = generation_.load() + 1;
    fn_ = &fn;
    done_tasks_.store(0, std::memory_order_relaxed);
    work_.store(((static_cast<std::uint64_t>(gen) & 0xFFFFFF) << (2 * kBits)) |
                    (static_cast<std::uint64_t>(num_tasks) << kBits),
                std::memory_order_release);
    generation_.store(gen, std::memory_order_release);
  }
  wake_.notify_all();
  drain();
  while (done_tasks_.load(std::memory_order_acquire) < num_tasks) cpu_relax();
}

int default_num_threads() {
  if (const char* env = std::getenv("R3MES_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

static std::mutex g_pool_mutex;
static std::unique_ptr<ThreadPool>& global_pool() {
  static std::unique_ptr<ThreadPool> pool;
  return pool;
}

static ThreadPool& pool() {
  auto& p = global_pool();
  if (!p) p = std::make_unique<ThreadPool>(default_num_threads());
  return *p;
}

int get_num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  return pool().num_threads();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (n <= 0) n = default_num_threads();
  auto& p = global_pool();
  if (p && p->num_threads() == n) return;
  p.reset();
  p = std::make_unique<ThreadPool>(n);
}

void parallel_for(std::size_t n, std::size_t grain,
                  const std::function<void(std::size_t, std::size_t)>& fn) {
  if (n == 0) return;
  grain = std::max<std::size_t>(grain, 1);
  std::size_t chunks = (n + grain - 1) / grain;
  if (chunks == 1) {
    fn(0, n);
    return;
  }
  // One kernel call at a time owns the pool; concurrent Python callers queue here.
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  pool().run(chunks, [&](std::size_t c) { fn(c * grain, std::min(n, (c + 1) * grain)); });
}

void parallel_per_thread(std::size_t n,
                         const std::function<void(std::size_t, std::size_t)>& fn) {
  const std::size_t threads = static_cast<std::size_t>(get_num_threads());
  parallel_for(n, (n + threads - 1) / threads, fn);
}

void parallel_rows(std::size_t n, const std::function<void(std::size_t, std::size_t)>& fn) {
  const std::size_t threads = static_cast<std::size_t>(get_num_threads());
  std::size_t grain = (n + threads * 8 - 1) / (threads * 8);
  parallel_for(n, std::max<std::size_t>(16, (grain + 15) / 16 * 16), fn);
}

}  // namespace r3mes
