#include "core/offload.h"

#include <cassert>

namespace imgfs {

Offloader::Offloader(EventLoop* loop) : loop_(loop), thread_([this] { worker(); }) {}

Offloader::~Offloader() {
    assert(pending_ == 0 && "Offloader destroyed with calls pending");
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    wake_.notify_one();
    thread_.join();
}

void Offloader::Submit::await_suspend(std::coroutine_handle<> h) {
    // The loop must not take "nothing in flight" for a hang while the worker has the call.
    self->loop_->hold_for_posts(1);
    ++self->pending_;
    {
        std::lock_guard<std::mutex> lock(self->mutex_);
        self->queue_.push_back(Call{std::move(work), h});
    }
    self->wake_.notify_one();
}

void Offloader::hand_over(std::function<void()> work) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.push_back(Call{std::move(work), {}});
    }
    wake_.notify_one();
}

void Offloader::worker() {
    for (;;) {
        Call call;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
            if (queue_.empty()) {
                return;  // stop_ with nothing left
            }
            call = std::move(queue_.front());
            queue_.pop_front();
        }
        call.work();
        if (!call.handle) {
            continue;  // handed over: nobody to resume
        }
        // The loop's post() publishes what the work wrote before the coroutine resumes.
        std::coroutine_handle<> h = call.handle;
        loop_->post([this, h] {
            loop_->hold_for_posts(-1);
            --pending_;
            ++completed_;
            loop_->schedule(h);
        });
    }
}

}  // namespace imgfs
