#include "workers.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace starcoder {
namespace {

// How long an idle worker keeps yielding before it sleeps: longer than the gaps between the
// calls of one decode step, far shorter than the pause between a user's keystrokes.
constexpr auto kAwake = std::chrono::milliseconds(5);

// One call's tasks, taken in turn by whichever thread asks next. Shared: a worker may pick it
// up after the call returned, and then finds no task left (so `task`, which refers to the
// caller's stack, is never run after the call returned).
struct Job {
  const std::function<void(int64_t)>* task;
  int64_t tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};

  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < tasks;) (*task)(i);
  }
};

class Workers {
 public:
  Workers() {
    const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
    for (int64_t i = 0; i + 1 < cores; ++i) {
      std::thread([this] { Loop(); }).detach();  // lives as long as the process
    }
    workers_ = cores - 1;
  }

  int64_t Count() const { return workers_; }

  void Run(int64_t tasks, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> own(calling_, std::try_to_lock);
    if (!own.owns_lock() || workers_ == 0 || tasks < 2) {
      for (int64_t i = 0; i < tasks; ++i) task(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->task = &task;
    job->tasks = tasks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = job;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    job->Work();
    // Every task is taken; wait for those a worker is still running.
    while (job->active.load() != 0) std::this_thread::yield();
  }

 private:
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto since = std::chrono::steady_clock::now();
      while (generation_.load() == seen) {
        if (std::chrono::steady_clock::now() - since > kAwake) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          break;
        }
        std::this_thread::yield();
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        job = current_;
        seen = generation_.load();
      }
      // Counted before taking a task, so that the caller waits for any task taken.
      job->active.fetch_add(1);
      job->Work();
      job->active.fetch_sub(1);
    }
  }

  int64_t workers_ = 0;
  std::mutex calling_;  // one call at a time uses the workers
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> current_;
};

Workers& TheWorkers() {
  static Workers* workers = new Workers();  // never destroyed: its threads never end
  return *workers;
}

}  // namespace

void Parallel(int64_t tasks, const std::function<void(int64_t)>& task) {
  TheWorkers().Run(tasks, task);
}

int64_t Threads() { return TheWorkers().Count() + 1; }

}  // namespace starcoder
