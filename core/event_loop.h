// EventLoop: one io_uring per loop thread. Every operation's completion record lives in its
// awaiter (inside the waiting coroutine's frame), so submitting never allocates. Completions are
// reaped in a batch and the CQ advanced before any waiter runs; waiters then run from the ready
// queue, never from inside the CQ iteration. SQEs are not submitted one by one: they accumulate
// while ready coroutines run and go to the kernel in one io_uring_enter when the loop goes idle.
#pragma once

#include <chrono>
#include <coroutine>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <liburing.h>

#include "core/buffer.h"
#include "core/executor.h"
#include "core/result.h"
#include "core/task.h"
#include "core/unique_fd.h"

namespace imgfs {

class EventLoop final : public Executor {
  public:
    struct Options {
        unsigned queue_depth = 256;
        /// 128-byte SQEs (IORING_SETUP_SQE128), which IORING_OP_URING_CMD commands with a
        /// larger command area need (FUSE-over-io_uring).
        bool big_sqes = false;
    };

    /// Sets up the ring and checks that the kernel supports every opcode the loop uses; the
    /// error names the missing ones.
    static Result<std::unique_ptr<EventLoop>> create(Options options);
    static Result<std::unique_ptr<EventLoop>> create() { return create(Options{}); }
    [[nodiscard]] bool big_sqes() const { return big_sqes_; }
    EventLoop(const EventLoop&) = delete;
    EventLoop& operator=(const EventLoop&) = delete;
    ~EventLoop();

    void schedule(std::coroutine_handle<> h) override { ready_.push_back(h); }

    /// The completion record of one SQE; lives in an awaiter.
    struct Completion {
        std::coroutine_handle<> handle;
        int32_t res = 0;
        uint32_t flags = 0;
    };

    /// Awaits one SQE prepared by `prep(sqe)`; returns the CQE's res (negative errno on error).
    template <typename Prep>
    struct SqeAwaiter : Completion {
        EventLoop* loop;
        Prep prep;
        SqeAwaiter(EventLoop* l, Prep p) : loop(l), prep(std::move(p)) {}
        bool await_ready() noexcept { return false; }
        void await_suspend(std::coroutine_handle<> h) {
            handle = h;
            io_uring_sqe* sqe = loop->get_sqe();
            prep(sqe);
            io_uring_sqe_set_data(sqe, static_cast<Completion*>(this));
            ++loop->ops_in_flight_;
        }
        int32_t await_resume() noexcept { return res; }
    };
    template <typename Prep>
    [[nodiscard]] SqeAwaiter<Prep> submit(Prep prep) {
        return SqeAwaiter<Prep>(this, std::move(prep));
    }

    // One-shot operations: the raw result of a single SQE (short transfers are the caller's).
    [[nodiscard]] auto read_some(int fd, MutBuf buf, uint64_t offset) {
        return submit([=](io_uring_sqe* sqe) {
            io_uring_prep_read(sqe, fd, buf.data(), static_cast<unsigned>(buf.size()), offset);
        });
    }
    [[nodiscard]] auto write_some(int fd, ConstBuf buf, uint64_t offset) {
        return submit([=](io_uring_sqe* sqe) {
            io_uring_prep_write(sqe, fd, buf.data(), static_cast<unsigned>(buf.size()), offset);
        });
    }
    [[nodiscard]] auto writev_some(int fd, const iovec* iov, unsigned count, uint64_t offset) {
        return submit(
            [=](io_uring_sqe* sqe) { io_uring_prep_writev(sqe, fd, iov, count, offset); });
    }

    /// Reads until `buf` is full or EOF; resubmits on EAGAIN/EINTR and continues short reads.
    /// Returns the bytes read (less than buf.size() only at EOF).
    Task<Result<size_t>> read_full(int fd, MutBuf buf, uint64_t offset);
    /// Writes all of `buf`, continuing short writes; resubmits on EAGAIN/EINTR.
    Task<Status> write_full(int fd, ConstBuf buf, uint64_t offset);
    /// Writes all of `iov` (which it consumes), continuing short writes.
    Task<Status> writev_full(int fd, IoVec* iov, uint64_t offset);
    /// fdatasync (datasync) or fsync.
    Task<Status> fsync(int fd, bool datasync);
    Task<Status> fallocate(int fd, int mode, uint64_t offset, uint64_t len);
    /// Suspends for at least `ns`.
    Task<void> sleep(std::chrono::nanoseconds ns);
    /// After an operation completed with `res` < 0: whether to issue it again. EINTR at once;
    /// EAGAIN (and ENOMEM if `memory`: the kernel was short of memory) after a pause that
    /// doubles each time, at most kMaxTransientRetries times (about a quarter second in all).
    Task<bool> retry_transient(int32_t res, int* attempts, bool memory);
    static constexpr int kMaxTransientRetries = 8;

    /// Runs until `done` is true. Returns false if nothing can make progress any more (no ready
    /// coroutine, no operation in flight, no cross-thread post pending): the caller hung.
    bool run_until(const bool* done);
    /// Runs until stop() is called.
    void run();
    void stop() { stop_ = true; }

    /// Thread-safe: queues `fn` to run on the loop thread and wakes the loop.
    void post(std::function<void()> fn);
    /// Loop thread only: while held, run_until() does not report a hang when nothing is in
    /// flight, because another thread has promised to post().
    void hold_for_posts(int delta) { external_holds_ += delta; }

    // Counters for tests and benchmarks.
    [[nodiscard]] uint64_t ops_in_flight() const { return ops_in_flight_; }
    [[nodiscard]] uint64_t submit_calls() const { return submit_calls_; }
    [[nodiscard]] uint64_t ops_completed() const { return ops_completed_; }

  private:
    EventLoop() = default;
    io_uring_sqe* get_sqe();
    /// Moves every available completion's waiter to the ready queue; returns how many.
    unsigned reap_completions();
    void run_ready();
    // Returns false when nothing is pending at all.
    bool wait_and_reap();
    void arm_wake_read();
    void drain_posted();

    io_uring ring_{};
    bool ring_ready_ = false;
    bool big_sqes_ = false;
    std::deque<std::coroutine_handle<>> ready_;
    uint64_t ops_in_flight_ = 0;
    uint64_t submit_calls_ = 0;
    uint64_t ops_completed_ = 0;
    bool stop_ = false;
    int external_holds_ = 0;

    // Cross-thread wake-up: an eventfd read kept posted on the ring. Its completion record is a
    // member, not an awaiter, because nobody waits for it.
    UniqueFd wake_fd_;
    uint64_t wake_value_ = 0;
    bool wake_armed_ = false;
    std::mutex posted_mutex_;
    std::vector<std::function<void()>> posted_;  // guarded by posted_mutex_
};

/// Runs the loop until `task` completes and returns its value. For main() and tests only:
/// never call it from inside a coroutine (that would nest event loops).
template <typename T>
T sync_wait(EventLoop* loop, Task<T> task);

namespace detail {
template <typename T>
Task<void> sync_wait_runner(Task<T> task, std::optional<T>* out, bool* done) {
    out->emplace(co_await std::move(task));
    *done = true;
}
Task<void> sync_wait_runner_void(Task<void> task, bool* done);
[[noreturn]] void sync_wait_hung();
}  // namespace detail

template <typename T>
T sync_wait(EventLoop* loop, Task<T> task) {
    std::optional<T> out;
    bool done = false;
    Task<void> runner = detail::sync_wait_runner<T>(std::move(task), &out, &done);
    loop->schedule(runner.handle());
    if (!loop->run_until(&done)) {
        detail::sync_wait_hung();
    }
    return std::move(*out);
}

template <>
inline void sync_wait<void>(EventLoop* loop, Task<void> task) {
    bool done = false;
    Task<void> runner = detail::sync_wait_runner_void(std::move(task), &done);
    loop->schedule(runner.handle());
    if (!loop->run_until(&done)) {
        detail::sync_wait_hung();
    }
}

}  // namespace imgfs
