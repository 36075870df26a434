#include "core/loop_thread.h"

#include <future>
#include <pthread.h>

namespace imgfs {

Result<std::unique_ptr<LoopThread>> LoopThread::start(EventLoop::Options options,
                                                      const std::string& name) {
    options.runs_on_another_thread = true;
    TRY_ASSIGN(std::unique_ptr<EventLoop> loop, EventLoop::create(options));
    std::unique_ptr<LoopThread> lt(new LoopThread(std::move(loop)));
    std::promise<Status> enabled;
    std::future<Status> enabled_result = enabled.get_future();
    lt->thread_ = std::thread([raw = lt.get(), name, &enabled] { raw->serve(name, &enabled); });
    // Waited for: until the thread has enabled the ring, nothing can be sent to it (a hop's
    // message to a disabled ring fails).
    Status st = enabled_result.get();
    if (!st) {
        lt->thread_.join();
        lt->thread_ = std::thread();
        return st.error();
    }
    return lt;
}

void LoopThread::serve(const std::string& name, std::promise<Status>* enabled) {
    ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
    // Only this thread submits to the ring from here on (EventLoop::create).
    Status st = loop_->enable_on_this_thread();
    const bool ok = st.ok();
    enabled->set_value(std::move(st));  // `enabled` is gone once the starter has the value
    if (!ok) {
        return;
    }
    // Nothing may be in flight between hops; the hold keeps the loop waiting instead of
    // reporting a hang. It is never released: only stop() ends this loop.
    loop_->hold_for_posts(1);
    loop_->run();
}

LoopThread::~LoopThread() {
    if (!thread_.joinable()) {
        return;  // the ring was never enabled: start() failed
    }
    EventLoop* loop = loop_.get();
    loop->post([loop] { loop->stop(); });
    thread_.join();
}

}  // namespace imgfs
