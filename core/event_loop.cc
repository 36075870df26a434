#include "core/event_loop.h"

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <thread>
#include <unistd.h>

#include <sys/eventfd.h>
#include <sys/syscall.h>

namespace imgfs {

namespace {

struct RequiredOp {
    int opcode;
    const char* name;
};

constexpr RequiredOp kRequiredOps[] = {
    {IORING_OP_READ, "READ"},       {IORING_OP_WRITE, "WRITE"},
    {IORING_OP_READV, "READV"},     {IORING_OP_WRITEV, "WRITEV"},
    {IORING_OP_FSYNC, "FSYNC"},     {IORING_OP_FALLOCATE, "FALLOCATE"},
    {IORING_OP_TIMEOUT, "TIMEOUT"}, {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL"},
};

// Tells the CPU this is a spin-wait (saves power, yields to a sibling hyperthread).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

Status probe_ops(io_uring* ring, bool* has_msg_ring) {
    io_uring_probe* probe = io_uring_get_probe_ring(ring);
    if (probe == nullptr) {
        return make_error(ENOSYS,
                          "io_uring: the kernel cannot report which opcodes it supports "
                          "(needs Linux 5.6 or later)");
    }
    std::string missing;
    for (const RequiredOp& op : kRequiredOps) {
        if (!io_uring_opcode_supported(probe, op.opcode)) {
            missing += missing.empty() ? "" : ", ";
            missing += op.name;
        }
    }
    *has_msg_ring = io_uring_opcode_supported(probe, IORING_OP_MSG_RING) != 0;
    io_uring_free_probe(probe);
    if (!missing.empty()) {
        return make_error(ENOSYS, "io_uring: this kernel lacks required opcodes: {}", missing);
    }
    return {};
}

}  // namespace

// Completions are deferred to the loop's own calls into the kernel (DEFER_TASKRUN, which needs
// SINGLE_ISSUER): without it, each completion, and each request the kernel's FUSE ring hands
// over, interrupted the loop's thread with an IPI to run the kernel's half of the work, and the
// loop ran that work one completion at a time. With it the work runs in a batch when the loop
// asks for completions. Measured on 4k random writes at queue depth 32 into allocated
// clusters (FUSE over io_uring, one loop): 97-101k IOPS before, 150-155k after; the daemon's
// profile had 14 % of its samples on the IPI's return path (docs/benchmarks.md, 2026-12-07).
// SINGLE_ISSUER means that only one thread submits to a ring: the thread that creates it, or,
// for a ring created disabled, the thread that enables it (LoopThread). The loop must ask the
// kernel for completions itself: see poll_for_completions.
Result<std::unique_ptr<EventLoop>> EventLoop::create(Options options) {
    std::unique_ptr<EventLoop> loop(new EventLoop());
    io_uring_params params{};
    const unsigned base_flags = IORING_SETUP_CLAMP | (options.big_sqes ? IORING_SETUP_SQE128 : 0) |
                                (options.runs_on_another_thread ? IORING_SETUP_R_DISABLED : 0);
    const unsigned defer_flags =
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    const unsigned cq_flags = options.cq_entries != 0 ? IORING_SETUP_CQSIZE : 0;
    params.flags = base_flags | cq_flags | (options.defer_completions ? defer_flags : 0);
    params.cq_entries = options.cq_entries;  // clamped to the kernel's maximum
    int ret = io_uring_queue_init_params(options.queue_depth, &loop->ring_, &params);
    loop->defers_completions_ = ret == 0 && options.defer_completions;
    if (ret == -EINVAL && options.defer_completions) {
        // A kernel before 6.1: completions interrupt the thread, as they did.
        params = io_uring_params{};
        params.flags = base_flags | cq_flags;
        params.cq_entries = options.cq_entries;
        ret = io_uring_queue_init_params(options.queue_depth, &loop->ring_, &params);
    }
    if (ret < 0) {
        return make_error(-ret,
                          "io_uring_queue_init (is io_uring disabled by "
                          "/proc/sys/kernel/io_uring_disabled?)");
    }
    loop->ring_ready_ = true;
    loop->big_sqes_ = options.big_sqes;
    loop->poll_max_ = options.poll_max;
    loop->poll_window_ = options.poll_max;
    TRY(probe_ops(&loop->ring_, &loop->has_msg_ring_));
    int efd = eventfd(0, EFD_CLOEXEC);
    if (efd < 0) {
        return make_error(errno, "eventfd");
    }
    loop->wake_fd_.reset(efd);
    loop->arm_wake_read();
    return loop;
}

Status EventLoop::enable_on_this_thread() {
    // Debian 12's liburing declares io_uring_enable_rings but its library lacks it.
    if (::syscall(__NR_io_uring_register, ring_.ring_fd, IORING_REGISTER_ENABLE_RINGS, nullptr,
                  0) != 0) {
        return make_error(errno, "io_uring: enabling the ring on the loop's thread");
    }
    return {};
}

EventLoop::~EventLoop() {
    if (ring_ready_) {
        io_uring_queue_exit(&ring_);
    }
}

io_uring_sqe* EventLoop::get_sqe() {
    for (;;) {
        if (io_uring_sqe* sqe = io_uring_get_sqe(&ring_)) {
            return sqe;
        }
        // SQ full: hand what we have to the kernel.
        ++submit_calls_;
        int ret = submit_for_sqe();
        if (ret > 0) {
            continue;
        }
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY && ret != -ENOMEM) {
            std::fprintf(stderr, "imgfs: io_uring_submit failed: %d\n", ret);
            std::abort();
        }
        // The kernel takes nothing until completions are reaped (the CQ overflowed: EBUSY) or
        // memory is back (EAGAIN, ENOMEM). Move completions to the ready queue (their waiters
        // run later, from the loop). If none is there, wait for one, but briefly: what is in
        // flight may complete only after what sits unsubmitted in the SQ (a /dev/fuse read
        // waits for a request that waits for our reply), so an unbounded wait could hang.
        if (reap_completions() == 0 && ops_in_flight_ > 0) {
            wait_briefly_for_completion();
            reap_completions();
        }
    }
}

int EventLoop::submit_for_sqe() {
    if (failing_submits_ > 0) {
        --failing_submits_;
        return -failing_submit_errno_;
    }
    return io_uring_submit(&ring_);
}

void EventLoop::wait_briefly_for_completion() {
    constexpr long kRetryNs = 1'000'000;
    if ((ring_.features & IORING_FEAT_EXT_ARG) != 0) {
        // The timeout travels as an argument, not as an SQE (there is no free one).
        __kernel_timespec timeout{.tv_sec = 0, .tv_nsec = kRetryNs};
        io_uring_cqe* cqe = nullptr;
        // Time-outs and interruptions need nothing: the caller reaps and submits again.
        (void)io_uring_wait_cqe_timeout(&ring_, &cqe, &timeout);
    } else {
        timespec pause{.tv_sec = 0, .tv_nsec = kRetryNs};
        nanosleep(&pause, nullptr);
    }
}

unsigned EventLoop::reap_completions() {
    io_uring_cqe* cqes[64];
    unsigned total = 0;
    for (;;) {
        unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, 64);
        if (n == 0) {
            return total;
        }
        for (unsigned i = 0; i < n; ++i) {
            auto data = reinterpret_cast<uintptr_t>(io_uring_cqe_get_data(cqes[i]));
            if (data == 0) {
                wake_armed_ = false;  // the wake-up read completed
                continue;
            }
            if (reap_tagged(data, cqes[i]->res)) {
                continue;
            }
            auto* c = reinterpret_cast<Completion*>(data);
            c->res = cqes[i]->res;
            c->flags = cqes[i]->flags;
            if (c->waits_for_work) {
                --work_waits_in_flight_;
            }
            ready_.push_back(c->handle);
            --ops_in_flight_;
            ++ops_completed_;
        }
        io_uring_cq_advance(&ring_, n);
        total += n;
    }
}

bool EventLoop::reap_tagged(uintptr_t data, int32_t res) {
    switch (data & kTagMask) {
        case kHopArrivedTag: {
            // Not counted in ops_in_flight_: the sender's loop issued it.
            auto* message = reinterpret_cast<Completion*>(data & ~kTagMask);
            ready_.push_back(message->handle);
            ++hops_received_;
            return true;
        }
        case kHopFailedTag: {
            // The message never arrived, so the coroutine is still suspended and its awaiter
            // alive: send it the slow way.
            auto* hop = reinterpret_cast<HopAwaiter*>(data & ~kTagMask);
            EventLoop* to = hop->to;
            std::coroutine_handle<> h = hop->message.handle;
            (void)res;
            to->post([to, h] { to->schedule(h); });
            return true;
        }
        default:
            return false;
    }
}

void EventLoop::HopAwaiter::await_suspend(std::coroutine_handle<> h) {
    message.handle = h;
    static_assert(alignof(Completion) > kTagMask && alignof(HopAwaiter) > kTagMask);
    if (!from->has_msg_ring_) {
        EventLoop* target = to;
        target->post([target, h] { target->schedule(h); });
        return;
    }
    io_uring_sqe* sqe = from->get_sqe();
    io_uring_prep_msg_ring(sqe, to->ring_.ring_fd, 0,
                           reinterpret_cast<uintptr_t>(&message) | kHopArrivedTag, 0);
    // On success the sender gets no completion: the coroutine (and this awaiter) may be gone
    // by the time the sender would reap it. A failure's completion names this awaiter.
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data(
        sqe, reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(this) | kHopFailedTag));
}

void EventLoop::arm_wake_read() {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_read(sqe, wake_fd_.get(), &wake_value_, sizeof wake_value_, 0);
    io_uring_sqe_set_data(sqe, nullptr);  // user_data 0 marks the wake-up read
    wake_armed_ = true;
}

void EventLoop::post(std::function<void()> fn) {
    {
        std::lock_guard<std::mutex> lock(posted_mutex_);
        posted_.push_back(std::move(fn));
    }
    uint64_t one = 1;
    // A failed write can only mean the counter is saturated, in which case a wake-up is pending.
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof one);
}

void EventLoop::drain_posted() {
    std::vector<std::function<void()>> fns;
    {
        std::lock_guard<std::mutex> lock(posted_mutex_);
        fns.swap(posted_);
    }
    for (auto& fn : fns) {
        fn();
    }
}

void EventLoop::run_ready() {
    // New coroutines scheduled while running are handled in the same pass; the loop goes back
    // to the kernel only when everything runnable has run (that is what batches submissions).
    while (!ready_.empty()) {
        std::coroutine_handle<> h = ready_.front();
        ready_.pop_front();
        h.resume();
    }
}

bool EventLoop::wait_and_reap() {
    // A reap inside get_sqe (SQ full) may have taken the wake-up read's completion without
    // draining the posts: re-armed here, before any sleep, or a post from another thread
    // would not wake this loop; and with posts already queued the loop does not sleep.
    if (!wake_armed_) {
        arm_wake_read();
    }
    bool posted_pending = false;
    {
        std::lock_guard<std::mutex> lock(posted_mutex_);
        posted_pending = !posted_.empty();
    }
    if (ops_in_flight_ == 0 && !posted_pending && external_holds_ == 0) {
        // Still submit queued SQEs (e.g. the wake-up read) so nothing is left half-done.
        io_uring_submit(&ring_);
        return false;
    }
    // Poll only when the loop waits for new work alone: a 4k read from a disk with the
    // page cache dropped went from 8.4-10.6k to 6.7-7.1k IOPS at QD1 when the loop spun
    // while the disk read was out (2026-12-04).
    const bool poll_eligible = poll_max_.count() > 0 && ops_in_flight_ == work_waits_in_flight_;
    // Coroutines made runnable by the reap inside get_sqe (the wake read's re-arm met a full
    // SQ) must not wait for the next completion: at queue depth 1 that may be the next
    // request, which the replies they would send hold up.
    // The wait is timed from before the spin: a completion that missed the window by a little
    // still came later than poll_max_ after the loop went idle, and the window must shrink.
    std::chrono::steady_clock::time_point idle_start;
    if (poll_eligible) {
        idle_start = std::chrono::steady_clock::now();
    }
    if (posted_pending || !ready_.empty()) {
        ++submit_calls_;
        io_uring_submit(&ring_);  // the posts are served below; completions are reaped as well
    } else if (!poll_eligible || poll_window_.count() == 0 || !poll_for_completions()) {
        ++submit_calls_;
        int ret = io_uring_submit_and_wait(&ring_, 1);
        if (ret == -ENOMEM || ret == -EAGAIN) {
            // The kernel is short of memory for a request: it did not wait, and asking again
            // at once would spin while the shortage lasts.
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        } else if (ret < 0 && ret != -EINTR && ret != -EBUSY && ret != -ETIME) {
            // EBADR among them: completions were lost, so some request would never end.
            std::fprintf(stderr, "imgfs: io_uring_submit_and_wait failed: %d\n", ret);
            std::abort();
        }
        if (poll_eligible) {
            adapt_poll_window(std::chrono::steady_clock::now() - idle_start);
        }
    }
    reap_completions();
    if (!wake_armed_) {
        arm_wake_read();
    }
    drain_posted();
    return true;
}

bool EventLoop::poll_for_completions() {
    ++submit_calls_;
    if (io_uring_submit(&ring_) < 0) {
        return false;  // the blocking submit reports it
    }
    auto deadline = std::chrono::steady_clock::now() + poll_window_;
    unsigned spins = 0;
    while (io_uring_cq_ready(&ring_) == 0) {
        // The deadline comes first, so that a kernel call that keeps failing below cannot
        // keep the loop spinning past its window.
        if ((++spins & 63) == 0 && std::chrono::steady_clock::now() >= deadline) {
            return false;
        }
        if ((IO_URING_READ_ONCE(*ring_.sq.kflags) & IORING_SQ_TASKRUN) != 0) {
            // Deferred completions wait for the loop to ask (create()); the peek in
            // reap_completions asks as well when this flag is up.
            (void)io_uring_get_events(&ring_);
            continue;
        }
        cpu_relax();
    }
    ++polls_caught_;
    return true;
}

void EventLoop::adapt_poll_window(std::chrono::steady_clock::duration waited) {
    // `waited`: from the moment the loop went idle (the spin included) to the completion. A
    // completion that came within the longest window would have been caught by polling:
    // poll the whole window next time. One that came later was not worth spinning for: halve
    // the window, so that a loop whose requests come seldom stops spinning (within a few
    // wake-ups) and one whose requests come often starts again at once.
    if (waited <= poll_max_) {
        poll_window_ = poll_max_;
    } else {
        poll_window_ /= 2;
    }
}

bool EventLoop::run_until(const bool* done) {
    for (;;) {
        run_ready();
        if (*done) {
            // Hand over SQEs the last coroutines queued; they complete on the next run.
            io_uring_submit(&ring_);
            return true;
        }
        const bool pending = wait_and_reap();
        inline_gate_.new_turn();
        if (!pending && ready_.empty()) {
            return false;
        }
    }
}

void EventLoop::run() {
    stop_ = false;
    run_until(&stop_);
}

Task<bool> EventLoop::retry_transient(int32_t res, int* attempts, bool memory) {
    if (res == -EINTR) {
        // A signal cut the call short: again at once, but not for ever (a file system that
        // kept answering EINTR would otherwise hold its caller in this loop).
        co_return ++*attempts <= kMaxInterruptedRetries;
    }
    bool transient = res == -EAGAIN || (memory && res == -ENOMEM);
    if (!transient || *attempts >= kMaxTransientRetries) {
        co_return false;
    }
    co_await sleep(std::chrono::milliseconds(1 << (*attempts)++));
    co_return true;
}

Task<Result<size_t>> EventLoop::read_full(int fd, MutBuf buf, uint64_t offset) {
    size_t done = 0;
    int attempts = 0;
    while (done < buf.size()) {
        int32_t res = co_await read_some(fd, buf.subspan(done), offset + done);
        if (res < 0 && co_await retry_transient(res, &attempts, true)) {
            continue;
        }
        if (res < 0) {
            co_return Error{-res, {}};
        }
        if (res == 0) {
            break;  // EOF
        }
        done += static_cast<size_t>(res);
    }
    co_return done;
}

Task<Status> EventLoop::write_full(int fd, ConstBuf buf, uint64_t offset) {
    size_t done = 0;
    int attempts = 0;
    while (done < buf.size()) {
        int32_t res = co_await write_some(fd, buf.subspan(done), offset + done);
        if (res < 0 && co_await retry_transient(res, &attempts, true)) {
            continue;
        }
        if (res < 0) {
            co_return Error{-res, {}};
        }
        if (res == 0) {
            co_return Error{EIO, "write made no progress"};
        }
        done += static_cast<size_t>(res);
    }
    co_return Status{};
}

Task<Status> EventLoop::writev_full(int fd, IoVec* iov, uint64_t offset) {
    uint64_t pos = offset;
    int attempts = 0;
    while (iov->bytes() > 0) {
        int32_t res = co_await writev_some(fd, iov->data(), iov->count(), pos);
        if (res < 0 && co_await retry_transient(res, &attempts, true)) {
            continue;
        }
        if (res < 0) {
            co_return Error{-res, {}};
        }
        if (res == 0) {
            co_return Error{EIO, "writev made no progress"};
        }
        iov->advance(static_cast<size_t>(res));
        pos += static_cast<uint64_t>(res);
    }
    co_return Status{};
}

Task<Status> EventLoop::fsync(int fd, bool datasync) {
    int attempts = 0;
    for (;;) {
        int32_t res = co_await submit([=](io_uring_sqe* sqe) {
            io_uring_prep_fsync(sqe, fd, datasync ? IORING_FSYNC_DATASYNC : 0);
        });
        // Not ENOMEM: whether a failed fsync did anything is unknown, so it is not repeated.
        if (res < 0 && co_await retry_transient(res, &attempts, false)) {
            continue;
        }
        if (res < 0) {
            co_return Error{-res, datasync ? "fdatasync" : "fsync"};
        }
        co_return Status{};
    }
}

Task<Status> EventLoop::start_writeback(int fd, uint64_t offset, uint64_t len) {
    int32_t res = co_await submit([=](io_uring_sqe* sqe) {
        io_uring_prep_sync_file_range(sqe, fd, static_cast<unsigned>(len), offset,
                                      SYNC_FILE_RANGE_WRITE);
    });
    if (res < 0) {
        co_return Error{-res, "sync_file_range"};
    }
    co_return Status{};
}

Task<Status> EventLoop::fallocate(int fd, int mode, uint64_t offset, uint64_t len) {
    int attempts = 0;
    for (;;) {
        int32_t res = co_await submit([=](io_uring_sqe* sqe) {
            io_uring_prep_fallocate(sqe, fd, mode, static_cast<off_t>(offset),
                                    static_cast<off_t>(len));
        });
        if (res < 0 && co_await retry_transient(res, &attempts, true)) {
            continue;
        }
        if (res < 0) {
            co_return Error{-res, "fallocate"};
        }
        co_return Status{};
    }
}

Task<void> EventLoop::sleep(std::chrono::nanoseconds ns) {
    __kernel_timespec ts{};
    ts.tv_sec = static_cast<int64_t>(ns.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long long>(ns.count() % 1'000'000'000);
    // The timespec must stay valid until the kernel has read it; it lives in this frame.
    const int32_t res = co_await submit_work_wait(
        [&ts](io_uring_sqe* sqe) { io_uring_prep_timeout(sqe, &ts, 0, 0); });
    if (res != -ETIME && res < 0) {
        // No timer (the kernel had no memory for it): a short pause on the thread instead, so
        // that a caller backing off between retries does not spin.
        std::this_thread::sleep_for(
            std::min<std::chrono::nanoseconds>(ns, std::chrono::milliseconds(1)));
    }
}

namespace detail {

Task<void> sync_wait_runner_void(Task<void> task, bool* done) {
    co_await std::move(task);
    *done = true;
}

void sync_wait_hung() {
    std::fprintf(stderr, "imgfs: sync_wait: the task can never complete (nothing pending)\n");
    std::abort();
}

}  // namespace detail

}  // namespace imgfs
