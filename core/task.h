// Task<T>: the one coroutine type. Lazy (nothing runs until awaited), owns its frame (destroyed
// with the Task), and hands control back to its awaiter by symmetric transfer, so deep chains of
// awaits never grow the stack.
#pragma once

#include <cassert>
#include <coroutine>
#include <exception>
#include <optional>
#include <utility>

namespace imgfs {

namespace detail {

struct TaskPromiseBase {
    std::coroutine_handle<> continuation = std::noop_coroutine();

    struct FinalAwaiter {
        bool await_ready() noexcept { return false; }
        template <typename Promise>
        std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> h) noexcept {
            return h.promise().continuation;
        }
        void await_resume() noexcept {}
    };

    std::suspend_always initial_suspend() noexcept { return {}; }
    FinalAwaiter final_suspend() noexcept { return {}; }
    // Exceptions are not an error channel here (Result<T> is); one escaping is a bug.
    void unhandled_exception() noexcept { std::terminate(); }
};

}  // namespace detail

template <typename T = void>
class [[nodiscard]] Task {
  public:
    struct promise_type : detail::TaskPromiseBase {
        std::optional<T> value;
        Task get_return_object() noexcept {
            return Task(std::coroutine_handle<promise_type>::from_promise(*this));
        }
        template <typename U>
        void return_value(U&& v) {
            value.emplace(std::forward<U>(v));
        }
    };
    using Handle = std::coroutine_handle<promise_type>;

    Task(Task&& other) noexcept : h_(std::exchange(other.h_, {})) {}
    Task& operator=(Task&& other) noexcept {
        if (this != &other) {
            destroy();
            h_ = std::exchange(other.h_, {});
        }
        return *this;
    }
    Task(const Task&) = delete;
    Task& operator=(const Task&) = delete;
    ~Task() { destroy(); }

    struct Awaiter {
        Handle h;
        bool await_ready() noexcept { return false; }
        std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
            h.promise().continuation = awaiting;
            return h;
        }
        T await_resume() {
            assert(h.promise().value.has_value());
            return std::move(*h.promise().value);
        }
    };
    Awaiter operator co_await() && noexcept {
        assert(h_);
        return Awaiter{h_};
    }

    /// For the few places that drive a task by hand (scope runner, sync_wait).
    [[nodiscard]] Handle handle() const { return h_; }
    [[nodiscard]] bool done() const { return h_ && h_.done(); }

  private:
    explicit Task(Handle h) : h_(h) {}
    void destroy() {
        if (h_) {
            h_.destroy();
            h_ = {};
        }
    }
    Handle h_;
};

template <>
class [[nodiscard]] Task<void> {
  public:
    struct promise_type : detail::TaskPromiseBase {
        Task get_return_object() noexcept {
            return Task(std::coroutine_handle<promise_type>::from_promise(*this));
        }
        void return_void() noexcept {}
    };
    using Handle = std::coroutine_handle<promise_type>;

    Task(Task&& other) noexcept : h_(std::exchange(other.h_, {})) {}
    Task& operator=(Task&& other) noexcept {
        if (this != &other) {
            destroy();
            h_ = std::exchange(other.h_, {});
        }
        return *this;
    }
    Task(const Task&) = delete;
    Task& operator=(const Task&) = delete;
    ~Task() { destroy(); }

    struct Awaiter {
        Handle h;
        bool await_ready() noexcept { return false; }
        std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
            h.promise().continuation = awaiting;
            return h;
        }
        void await_resume() noexcept {}
    };
    Awaiter operator co_await() && noexcept {
        assert(h_);
        return Awaiter{h_};
    }

    [[nodiscard]] Handle handle() const { return h_; }
    [[nodiscard]] bool done() const { return h_ && h_.done(); }

  private:
    explicit Task(Handle h) : h_(h) {}
    void destroy() {
        if (h_) {
            h_.destroy();
            h_ = {};
        }
    }
    Handle h_;
};

}  // namespace imgfs
