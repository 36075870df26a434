// WaitQueue: the event/queue primitive the other synchronisation types are built from. Waiters
// are intrusive nodes living in the waiting coroutine's frame, so waiting never allocates.
#pragma once

#include <coroutine>
#include <cstddef>

#include "core/executor.h"

namespace imgfs {

class WaitQueue {
  public:
    explicit WaitQueue(Executor* executor) : executor_(executor) {}
    WaitQueue(const WaitQueue&) = delete;
    WaitQueue& operator=(const WaitQueue&) = delete;

    struct Waiter {
        WaitQueue* queue;
        std::coroutine_handle<> handle;
        Waiter* next = nullptr;

        bool await_ready() noexcept { return false; }
        void await_suspend(std::coroutine_handle<> h) noexcept {
            handle = h;
            queue->push(this);
        }
        void await_resume() noexcept {}
    };

    /// Suspends until notified. Wake-ups are FIFO.
    [[nodiscard]] Waiter wait() { return Waiter{this, {}}; }

    /// Schedules the oldest waiter. Returns false if nobody waits.
    bool notify_one();
    /// Schedules every current waiter (not ones that start waiting afterwards).
    void notify_all();

    [[nodiscard]] bool empty() const { return head_ == nullptr; }
    [[nodiscard]] size_t size() const { return size_; }
    [[nodiscard]] Executor* executor() const { return executor_; }

  private:
    void push(Waiter* w);

    Executor* executor_;
    Waiter* head_ = nullptr;
    Waiter* tail_ = nullptr;
    size_t size_ = 0;
};

/// A manual-reset event: wait() returns at once while set.
class AsyncEvent {
  public:
    explicit AsyncEvent(Executor* executor, bool set = false) : waiters_(executor), set_(set) {}

    void set() {
        set_ = true;
        waiters_.notify_all();
    }
    void reset() { set_ = false; }
    [[nodiscard]] bool is_set() const { return set_; }

    struct Awaiter {
        AsyncEvent* event;
        WaitQueue::Waiter waiter;
        bool await_ready() noexcept { return event->set_; }
        void await_suspend(std::coroutine_handle<> h) noexcept { waiter.await_suspend(h); }
        void await_resume() noexcept {}
    };
    [[nodiscard]] Awaiter wait() { return Awaiter{this, waiters_.wait()}; }

  private:
    WaitQueue waiters_;
    bool set_;
};

}  // namespace imgfs
