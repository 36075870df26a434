// LoopThread: an EventLoop served by a thread of its own, for coroutines handed to it with
// EventLoop::resume_on (or work handed with post()). It is how the FUSE transport gets a loop
// per core: each such loop owns a ring, and what runs on it must touch only what that loop
// owns or what its owner hands over explicitly.
#pragma once

#include <future>
#include <memory>
#include <string>
#include <thread>

#include "core/event_loop.h"
#include "core/result.h"

namespace imgfs {

class LoopThread {
  public:
    /// Creates the loop and starts the thread (named `name`, at most 15 characters).
    static Result<std::unique_ptr<LoopThread>> start(EventLoop::Options options,
                                                     const std::string& name);
    LoopThread(const LoopThread&) = delete;
    LoopThread& operator=(const LoopThread&) = delete;
    /// Stops the loop and joins the thread. Every coroutine hopped here must have left: one
    /// still on the loop is never resumed.
    ~LoopThread();

    [[nodiscard]] EventLoop* loop() const { return loop_.get(); }

  private:
    explicit LoopThread(std::unique_ptr<EventLoop> loop) : loop_(std::move(loop)) {}
    void serve(const std::string& name, std::promise<Status>* enabled);

    // Destruction order: the thread is joined (in the destructor's body) before the loop goes.
    std::unique_ptr<EventLoop> loop_;
    std::thread thread_;
};

}  // namespace imgfs
