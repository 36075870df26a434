#include "core/wait_queue.h"

namespace imgfs {

void WaitQueue::push(Waiter* w) {
    w->next = nullptr;
    if (tail_ != nullptr) {
        tail_->next = w;
    } else {
        head_ = w;
    }
    tail_ = w;
    ++size_;
}

bool WaitQueue::notify_one() {
    Waiter* w = head_;
    if (w == nullptr) {
        return false;
    }
    head_ = w->next;
    if (head_ == nullptr) {
        tail_ = nullptr;
    }
    --size_;
    executor_->schedule(w->handle);
    return true;
}

void WaitQueue::notify_all() {
    Waiter* w = head_;
    head_ = tail_ = nullptr;
    size_ = 0;
    while (w != nullptr) {
        // Read next before scheduling: the waiter's frame may be resumed (and the node gone)
        // only later, but keep the habit of never touching a node after handing it off.
        Waiter* next = w->next;
        executor_->schedule(w->handle);
        w = next;
    }
}

}  // namespace imgfs
