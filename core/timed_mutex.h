// TimedMutex: a coroutine mutex whose waiters give up after a bound. The control plane uses one
// per image (and one for the directory) so that a second short operation waits for the one in
// progress, but never for ever.
//
// Waiters queue FIFO and ownership passes directly to the oldest on unlock, so newcomers cannot
// starve a waiter. Bounded waits are timed out by one small timer task per mutex, spawned into
// `timers` while any bounded waiter exists; it ends soon after the last waiter has left, so
// joining that scope at shutdown is quick. The waiter list lives in a shared state that the
// timer task and the guards keep alive, so neither outlives what it points at.
#pragma once

#include <chrono>
#include <memory>
#include <optional>

#include "core/event_loop.h"
#include "core/task.h"
#include "core/task_scope.h"

namespace imgfs {

class TimedMutex {
    struct State;

  public:
    TimedMutex(EventLoop* loop, TaskScope* timers);
    TimedMutex(const TimedMutex&) = delete;
    TimedMutex& operator=(const TimedMutex&) = delete;
    ~TimedMutex();

    /// Ownership of the mutex; unlocks when it goes (or on release()).
    class [[nodiscard]] Guard {
      public:
        Guard() = default;
        Guard(Guard&& o) noexcept = default;
        Guard& operator=(Guard&& o) noexcept;
        Guard(const Guard&) = delete;
        Guard& operator=(const Guard&) = delete;
        ~Guard() { release(); }
        void release();
        [[nodiscard]] bool owns() const { return state_ != nullptr; }

      private:
        friend class TimedMutex;
        explicit Guard(std::shared_ptr<State> s) : state_(std::move(s)) {}
        std::shared_ptr<State> state_;
    };

    /// Waits at most `timeout` for the mutex. An empty optional means it timed out.
    Task<std::optional<Guard>> lock_for(std::chrono::nanoseconds timeout);
    /// Waits as long as it takes (steps of a running job, shutdown).
    Task<Guard> lock();
    /// The mutex now, or nothing.
    std::optional<Guard> try_lock();

    [[nodiscard]] bool locked() const;
    /// Coroutines waiting for it now.
    [[nodiscard]] size_t waiters() const;

  private:
    struct Enqueue;
    static Task<void> expire_waiters(std::shared_ptr<State> s);

    std::shared_ptr<State> state_;
};

}  // namespace imgfs
