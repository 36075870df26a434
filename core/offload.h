// Offloader: runs blocking system calls (directory listings, link/unlink/rename, header reads of
// files that are not open, statvfs) on a worker thread, so the event loop never stalls on them.
// The calling coroutine suspends and is resumed on the loop with the result.
//
// What runs on the worker must be self-contained: plain syscalls on values it was given. It
// never touches the graph, nodes or anything else of the loop thread.
//
// One worker, so calls run one at a time in the order they were made. Callers rely on that:
// a finishing stream's check that no unserved image uses the layers it deletes completes
// before a later rescan lists the directory (StreamJob::finish marks them only after it).
// More workers would need those marks made before the check.
#pragma once

#include <condition_variable>
#include <coroutine>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "core/event_loop.h"
#include "core/task.h"

namespace imgfs {

class Offloader {
  public:
    explicit Offloader(EventLoop* loop);
    Offloader(const Offloader&) = delete;
    Offloader& operator=(const Offloader&) = delete;
    /// Stops and joins the worker. No call may still be waiting.
    ~Offloader();

    /// Runs `fn` on the worker; resumes on the loop with its result.
    template <typename T>
    Task<T> run(std::function<T()> fn) {
        std::optional<T> out;
        // The work runs while this frame is suspended in the await below, so the references it
        // holds stay valid. Named, not a temporary of the co_await: GCC 12 destroys such
        // temporaries twice.
        Submit submit{this, [&out, &fn] { out.emplace(fn()); }};
        co_await submit;
        co_return std::move(*out);
    }

    /// Runs `work` on the worker with nobody waiting for it: cleanup that must not block the
    /// loop where no coroutine can wait (a destructor). Queued work runs before the
    /// destructor returns, so what it uses must outlive the Offloader, not the caller.
    void hand_over(std::function<void()> work);

    /// Whether the caller runs on the worker thread.
    [[nodiscard]] bool on_worker() const { return std::this_thread::get_id() == thread_.get_id(); }

    /// Calls completed so far (tests).
    [[nodiscard]] uint64_t completed() const { return completed_; }

  private:
    struct Call {
        std::function<void()> work;
        std::coroutine_handle<> handle;
    };
    struct Submit {
        Offloader* self;
        std::function<void()> work;
        bool await_ready() noexcept { return false; }
        void await_suspend(std::coroutine_handle<> h);
        void await_resume() noexcept {}
    };
    void worker();

    EventLoop* loop_;
    uint64_t completed_ = 0;  // loop thread only
    uint64_t pending_ = 0;    // loop thread only: submitted, not yet resumed
    std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<Call> queue_;  // guarded by mutex_
    bool stop_ = false;       // guarded by mutex_
    std::thread thread_;
};

}  // namespace imgfs
