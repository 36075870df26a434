// CoMutex: a coroutine mutex. Ownership passes directly to the next waiter on unlock, so a
// stream of newcomers cannot starve a waiter.
#pragma once

#include <utility>

#include "core/task.h"
#include "core/wait_queue.h"

namespace imgfs {

class CoMutex {
  public:
    explicit CoMutex(Executor* executor) : waiters_(executor) {}
    CoMutex(const CoMutex&) = delete;
    CoMutex& operator=(const CoMutex&) = delete;

    class [[nodiscard]] Guard {
      public:
        Guard() = default;
        explicit Guard(CoMutex* m) : m_(m) {}
        Guard(Guard&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
        Guard& operator=(Guard&& o) noexcept {
            if (this != &o) {
                release();
                m_ = std::exchange(o.m_, nullptr);
            }
            return *this;
        }
        Guard(const Guard&) = delete;
        Guard& operator=(const Guard&) = delete;
        ~Guard() { release(); }
        void release() {
            if (m_ != nullptr) {
                std::exchange(m_, nullptr)->unlock();
            }
        }

      private:
        CoMutex* m_ = nullptr;
    };

    struct LockAwaiter {
        CoMutex* m;
        WaitQueue::Waiter waiter;
        bool await_ready() noexcept {
            if (!m->locked_) {
                m->locked_ = true;
                return true;
            }
            return false;
        }
        void await_suspend(std::coroutine_handle<> h) noexcept { waiter.await_suspend(h); }
        // Resumed by unlock(), which left locked_ set: ownership was handed over.
        Guard await_resume() noexcept { return Guard(m); }
    };

    /// `auto guard = co_await mutex.lock();`
    [[nodiscard]] LockAwaiter lock() { return LockAwaiter{this, waiters_.wait()}; }

    [[nodiscard]] bool try_lock() {
        if (locked_) {
            return false;
        }
        locked_ = true;
        return true;
    }
    void unlock() {
        if (!waiters_.notify_one()) {
            locked_ = false;
        }
    }
    [[nodiscard]] bool locked() const { return locked_; }

  private:
    WaitQueue waiters_;
    bool locked_ = false;
};

}  // namespace imgfs
