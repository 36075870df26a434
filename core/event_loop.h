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
#include "core/inline_gate.h"
#include "core/result.h"
#include "core/task.h"
#include "core/unique_fd.h"

namespace imgfs {

class EventLoop final : public Executor {
  public:
    struct Options {
        unsigned queue_depth = 256;
        /// Completion queue entries (0: the kernel's default, twice queue_depth). Operations
        /// in flight are not bounded by the submission queue: a completion that finds the
        /// queue full goes to a list the kernel allocates for, and is lost if that fails
        /// (under memory pressure, when our files are the I/O path of a loop device). So the
        /// queue holds what may complete at once: every FUSE ring entry, and room for the rest.
        unsigned cq_entries = 0;
        /// 128-byte SQEs (IORING_SETUP_SQE128), which IORING_OP_URING_CMD commands with a
        /// larger command area need (FUSE-over-io_uring).
        bool big_sqes = false;
        /// Before the loop sleeps in io_uring_enter it may watch its completion queue for up
        /// to this long (0: never sleeps without going to the kernel first). Waking a thread
        /// whose CPU has gone idle costs far more than a short spin on a busy one, and a
        /// request arrives as a completion, so a loop under load saves that wake-up per
        /// request. The window adapts: see wait_and_reap.
        std::chrono::microseconds poll_max{0};
        /// The loop is created here but runs on another thread (LoopThread), which must call
        /// enable_on_this_thread() before anything else uses the loop. See create().
        bool runs_on_another_thread = false;
        /// Completions wait for the loop to ask for them (see create()) where the kernel can.
        bool defer_completions = true;
    };

    /// Sets up the ring and checks that the kernel supports every opcode the loop uses; the
    /// error names the missing ones.
    static Result<std::unique_ptr<EventLoop>> create(Options options);
    static Result<std::unique_ptr<EventLoop>> create() { return create(Options{}); }
    [[nodiscard]] bool big_sqes() const { return big_sqes_; }
    /// Whether completions wait for the loop to ask for them (IORING_SETUP_DEFER_TASKRUN)
    /// instead of interrupting its thread; false on kernels before 6.1.
    [[nodiscard]] bool defers_completions() const { return defers_completions_; }
    /// For a loop created with Options::runs_on_another_thread: makes the calling thread the
    /// one that submits to the ring. Called once, on the thread that runs the loop.
    Status enable_on_this_thread();
    EventLoop(const EventLoop&) = delete;
    EventLoop& operator=(const EventLoop&) = delete;
    ~EventLoop();

    void schedule(std::coroutine_handle<> h) override { ready_.push_back(h); }

    /// The completion record of one SQE; lives in an awaiter.
    struct Completion {
        std::coroutine_handle<> handle;
        int32_t res = 0;
        uint32_t flags = 0;
        bool waits_for_work = false;  // see submit_work_wait
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
            if (this->waits_for_work) {
                ++loop->work_waits_in_flight_;
            }
        }
        int32_t await_resume() noexcept { return res; }
    };
    template <typename Prep>
    [[nodiscard]] SqeAwaiter<Prep> submit(Prep prep) {
        return SqeAwaiter<Prep>(this, std::move(prep));
    }
    /// submit() for an operation that waits for new work to arrive (the next FUSE request, a
    /// timer) rather than for I/O the loop asked a device for. The loop polls only while every
    /// operation in flight is such a wait: spinning while a disk read is out measured slower
    /// (see wait_and_reap).
    template <typename Prep>
    [[nodiscard]] SqeAwaiter<Prep> submit_work_wait(Prep prep) {
        SqeAwaiter<Prep> awaiter(this, std::move(prep));
        awaiter.waits_for_work = true;
        return awaiter;
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
    /// Starts writeback of the dirty pages of [offset, offset + len) (sync_file_range with
    /// SYNC_FILE_RANGE_WRITE only) and does not wait for it. It reads no error the writeback
    /// meets later: those stay for the next fsync of the file to report.
    Task<Status> start_writeback(int fd, uint64_t offset, uint64_t len);
    /// Suspends for at least `ns`.
    Task<void> sleep(std::chrono::nanoseconds ns);
    /// After an operation completed with `res` < 0: whether to issue it again. EINTR at once,
    /// counted against kMaxInterruptedRetries; EAGAIN (and ENOMEM if `memory`: the kernel was short
    /// of memory) after a pause that doubles each time, at most kMaxTransientRetries times (about a
    /// quarter second in all).
    Task<bool> retry_transient(int32_t res, int* attempts, bool memory);
    static constexpr int kMaxTransientRetries = 8;
    static constexpr int kMaxInterruptedRetries = 64;

    /// Runs until `done` is true. Returns false if nothing can make progress any more (no ready
    /// coroutine, no operation in flight, no cross-thread post pending): the caller hung.
    bool run_until(const bool* done);
    /// Runs until stop() is called.
    void run();
    void stop() { stop_ = true; }

    /// Thread-safe: queues `fn` to run on the loop thread and wakes the loop.
    void post(std::function<void()> fn);
    /// Loop thread only: while held, run_until() does not report a hang when nothing is in
    /// flight, because another thread has promised to post() or to hop a coroutine here.
    void hold_for_posts(int delta) { external_holds_ += delta; }

    /// Moves the awaiting coroutine from this loop's thread to `target`'s: it resumes there,
    /// from `target`'s ready queue (at once, on this thread, if `target` is this loop). The
    /// hop is an IORING_OP_MSG_RING message that lands in `target`'s completion queue: it
    /// rides on this loop's next io_uring_enter and wakes `target` without an eventfd write.
    /// If the message cannot be delivered (the target's CQ is full, or the kernel lacks
    /// MSG_RING) the hop falls back to post(). Whoever hops coroutines to a loop must keep it
    /// running (hold_for_posts) until they are back: a coroutine left on a stopped loop never
    /// resumes. A coroutine body that hops must not use a thread-local value (errno,
    /// pthread_self) on both sides of the hop: compilers may take its address once per body.
    struct HopAwaiter {
        EventLoop* from;
        EventLoop* to;
        Completion message{};  // what `to` reaps; only its handle is used
        bool await_ready() const noexcept { return from == to; }
        void await_suspend(std::coroutine_handle<> h);
        void await_resume() const noexcept {}
    };
    [[nodiscard]] HopAwaiter resume_on(EventLoop* target) { return HopAwaiter{this, target}; }

    /// The bounds of I/O made synchronously on this loop's thread (see InlineGate).
    [[nodiscard]] InlineGate& inline_gate() { return inline_gate_; }

    // Counters for tests and benchmarks.
    [[nodiscard]] uint64_t ops_in_flight() const { return ops_in_flight_; }
    [[nodiscard]] uint64_t submit_calls() const { return submit_calls_; }
    [[nodiscard]] uint64_t ops_completed() const { return ops_completed_; }
    [[nodiscard]] uint64_t hops_received() const { return hops_received_; }
    /// The completion queue's size as the kernel made it (Options::cq_entries).
    [[nodiscard]] unsigned completion_slots() const { return ring_.cq.ring_entries; }
    [[nodiscard]] uint64_t polls_caught() const { return polls_caught_; }
    [[nodiscard]] std::chrono::microseconds poll_window() const { return poll_window_; }

    /// Test seam: the next `count` submissions made because the SQ is full fail with `err`
    /// (EAGAIN, ENOMEM: what the kernel returns under memory pressure) and submit nothing.
    void fail_full_queue_submits_for_test(int count, int err) {
        failing_submits_ = count;
        failing_submit_errno_ = err;
    }

  private:
    EventLoop() = default;
    io_uring_sqe* get_sqe();
    int submit_for_sqe();
    /// Waits up to a millisecond for a completion, without needing an SQE.
    void wait_briefly_for_completion();
    /// Moves every available completion's waiter to the ready queue; returns how many.
    unsigned reap_completions();
    void run_ready();
    // Returns false when nothing is pending at all.
    bool wait_and_reap();
    /// Submits, then spins on the completion queue for up to poll_window_; true if a
    /// completion arrived meanwhile.
    bool poll_for_completions();
    /// Adapts poll_window_ to how long a blocking wait took.
    void adapt_poll_window(std::chrono::steady_clock::duration waited);
    void arm_wake_read();
    void drain_posted();
    /// A completion whose user_data is tagged (low bits; records are 8-byte aligned) is not an
    /// operation of this loop: a hop arriving, or a hop this loop sent that failed.
    bool reap_tagged(uintptr_t data, int32_t res);
    static constexpr uintptr_t kTagMask = 3;
    static constexpr uintptr_t kHopArrivedTag = 1;  // a HopAwaiter's `message`
    static constexpr uintptr_t kHopFailedTag = 2;   // the HopAwaiter itself

    io_uring ring_{};
    bool ring_ready_ = false;
    bool big_sqes_ = false;
    bool defers_completions_ = false;
    bool has_msg_ring_ = false;
    std::chrono::microseconds poll_max_{0};
    std::chrono::microseconds poll_window_{0};  // this wait's spin; 0 to poll_max_
    uint64_t polls_caught_ = 0;
    std::deque<std::coroutine_handle<>> ready_;
    uint64_t ops_in_flight_ = 0;
    uint64_t work_waits_in_flight_ = 0;  // of ops_in_flight_, those of submit_work_wait
    uint64_t submit_calls_ = 0;
    uint64_t ops_completed_ = 0;
    uint64_t hops_received_ = 0;
    InlineGate inline_gate_;
    bool stop_ = false;
    int external_holds_ = 0;
    int failing_submits_ = 0;
    int failing_submit_errno_ = 0;

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
