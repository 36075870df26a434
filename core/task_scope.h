// TaskScope: owner of spawned work. Nothing is detached: every spawned task is counted here and
// join() waits for all of them, so shutdown and drain can know when background work is over.
#pragma once

#include <cstddef>

#include "core/task.h"
#include "core/wait_queue.h"

namespace imgfs {

class TaskScope {
  public:
    explicit TaskScope(Executor* executor) : executor_(executor), idle_(executor) {}
    TaskScope(const TaskScope&) = delete;
    TaskScope& operator=(const TaskScope&) = delete;
    /// A scope must be joined before it goes away: its tasks point into it.
    ~TaskScope();

    /// Starts `task` now (it runs until its first suspension before spawn returns) and keeps
    /// count of it until it finishes.
    void spawn(Task<void> task);

    /// Waits until no task of this scope is running.
    Task<void> join();

    [[nodiscard]] size_t active() const { return active_; }
    [[nodiscard]] Executor* executor() const { return executor_; }

  private:
    void task_done();

    Executor* executor_;
    WaitQueue idle_;
    size_t active_ = 0;
};

}  // namespace imgfs
