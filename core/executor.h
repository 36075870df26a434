// Executor: where woken coroutines are resumed. The event loop is the real one; tests may use
// a manual one. Resuming through an executor (never inline from a notify) keeps stacks flat and
// stops a waker from running a woken coroutine in the middle of its own critical section.
#pragma once

#include <coroutine>

namespace imgfs {

class Executor {
  public:
    /// Queues `h` to be resumed later on the executor's thread. Must be called on that thread.
    virtual void schedule(std::coroutine_handle<> h) = 0;

  protected:
    Executor() = default;
    ~Executor() = default;
};

/// `co_await Yield{ex}` suspends and lets every coroutine already queued on `ex` run first
/// (tests use it to shuffle the order in which concurrent requests make progress).
struct Yield {
    Executor* ex;
    [[nodiscard]] bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) const { ex->schedule(h); }
    void await_resume() const noexcept {}
};

}  // namespace imgfs
