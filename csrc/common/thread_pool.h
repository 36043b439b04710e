#pragma once
// A persistent worker pool for the kernels. Decode GEMVs take tens of
// microseconds, so waking threads must be cheap: workers spin briefly on a
// generation counter before sleeping on a condition variable.
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace r3mes {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(task) for task in [0, num_tasks), spread over the pool and the
  // calling thread; returns when all are done. Not re-entrant. num_tasks is
  // capped at kMaxTasks (callers size their chunks accordingly).
  static constexpr std::size_t kMaxTasks = (1u << 20) - 1;
  void run(std::size_t num_tasks, const std::function<void(std::size_t)>& fn);

 private:
  void worker_loop();
  void drain();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<unsigned long> generation_{0};
  // The work of one call, in one word so a task is claimed with one CAS that
  // also proves which call it belongs to: [generation:24 | tasks:20 | next:20].
  // A worker that wakes late sees a finished or newer call and claims nothing,
  // so run() returns as soon as the tasks are done, without waiting for
  // sleeping workers to acknowledge.
  std::atomic<std::uint64_t> work_{0};
  std::atomic<std::size_t> done_tasks_{0};
  const std::function<void(std::size_t)>* fn_ = nullptr;
  bool stop_ = false;
};

int default_num_threads();
int get_num_threads();
void set_num_threads(int n);  // n <= 0 restores the default (number of cores)

// Splits [0, n) into chunks of `grain` (the last may be shorter) and runs
// fn(begin, end) for each on the global pool. Runs inline when one chunk.
void parallel_for(std::size_t n, std::size_t grain,
                  const std::function<void(std::size_t, std::size_t)>& fn);

// [0, n) split evenly, one chunk a thread (inline for one thread or n <= 1): row-wise work
// of similar cost per row, such as quantising a batch's activations.
void parallel_per_thread(std::size_t n, const std::function<void(std::size_t, std::size_t)>& fn);

// Output rows [0, n) of an LM-head product split into about 8 chunks a thread, multiples of
// 16 rows (the chunks are claimed dynamically, so a slow thread takes fewer).
void parallel_rows(std::size_t n, const std::function<void(std::size_t, std::size_t)>& fn);

}  // namespace r3mes
