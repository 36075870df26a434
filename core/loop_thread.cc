#include "core/loop_thread.h"

#include <pthread.h>

namespace imgfs {

Result<std::unique_ptr<LoopThread>> LoopThread::start(EventLoop::Options options,
                                                      const std::string& name) {
    TRY_ASSIGN(std::unique_ptr<EventLoop> loop, EventLoop::create(options));
    std::unique_ptr<LoopThread> lt(new LoopThread(std::move(loop)));
    lt->thread_ = std::thread([raw = lt.get(), name] { raw->serve(name); });
    return lt;
}

void LoopThread::serve(const std::string& name) {
    ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
    // Nothing may be in flight between hops; the hold keeps the loop waiting instead of
    // reporting a hang. It is never released: only stop() ends this loop.
    loop_->hold_for_posts(1);
    loop_->run();
}

LoopThread::~LoopThread() {
    EventLoop* loop = loop_.get();
    loop->post([loop] { loop->stop(); });
    thread_.join();
}

}  // namespace imgfs
