#include "core/range_lock.h"

#include <cassert>

namespace imgfs {

namespace {

bool overlaps(uint64_t a_off, uint64_t a_len, uint64_t b_off, uint64_t b_len) {
    // Without forming an end: a range may end exactly at 2^64 (the last block of a node's
    // address space), which wraps to 0. "x < off + len" is "x < off || x - off < len".
    const bool a_starts_before_b_ends = a_off < b_off || a_off - b_off < b_len;
    const bool b_starts_before_a_ends = b_off < a_off || b_off - a_off < a_len;
    return a_starts_before_b_ends && b_starts_before_a_ends;
}

}  // namespace

RangeLock::~RangeLock() {
    assert(head_ == nullptr && "RangeLock destroyed with tracked requests");
}

RangeLock::Request::Request(RangeLock* lock, uint64_t offset, uint64_t bytes, bool serialising)
    : lock_(lock),
      offset_(offset),
      bytes_(bytes),
      serialising_(serialising),
      waiters_(lock->executor_) {}

void RangeLock::Request::release() {
    if (tracked_) {
        lock_->remove(this);
        for (Request* r = lock_->head_; r != nullptr; r = r->next_) {
            if (r->waiting_for_ == this) {
                r->waiting_for_ = nullptr;  // woken below; this request may be gone by then
            }
        }
        waiters_.notify_all();
    }
}

void RangeLock::insert(Request* req) {
    assert(!req->tracked_);
    req->prev_ = nullptr;
    req->next_ = head_;
    if (head_ != nullptr) {
        head_->prev_ = req;
    }
    head_ = req;
    req->tracked_ = true;
    req->running_ = false;
    req->waiting_for_ = nullptr;
    req->seq_ = next_seq_++;
    ++count_;
}

void RangeLock::remove(Request* req) {
    assert(req->tracked_);
    if (req->prev_ != nullptr) {
        req->prev_->next_ = req->next_;
    } else {
        head_ = req->next_;
    }
    if (req->next_ != nullptr) {
        req->next_->prev_ = req->prev_;
    }
    req->prev_ = req->next_ = nullptr;
    req->tracked_ = false;
    req->running_ = false;
    --count_;
}

// The running request `self` must wait for, or null. See the header for both rules.
RangeLock::Request* RangeLock::find_conflict(const Request* self) const {
    for (Request* r = head_; r != nullptr; r = r->next_) {
        if (r == self || (!r->serialising_ && !self->serialising_)) {
            continue;
        }
        if (!overlaps(r->offset_, r->bytes_, self->offset_, self->bytes_)) {
            continue;
        }
        if (r->running_) {
            return r;
        }
        // An older waiter keeps its turn: wait behind it, for what it waits for (a running
        // request or one older still). One woken but not yet resumed waits for nothing: wait for it
        // itself, or a newcomer arriving in that gap would pass it, and the next one again, without
        // end.
        if (r->seq_ < self->seq_) {
            assert(r->waiting_for_ == nullptr || r->waiting_for_->running_ ||
                   r->waiting_for_->seq_ < r->seq_);
            return r->waiting_for_ != nullptr ? r->waiting_for_ : r;
        }
    }
    return nullptr;
}

Task<void> RangeLock::acquire(Request* req) {
    insert(req);
    while (Request* conflict = find_conflict(req)) {
        req->waiting_for_ = conflict;
        co_await conflict->waiters_.wait();
        req->waiting_for_ = nullptr;  // release() cleared it already; conflict may be gone
    }
    req->running_ = true;
}

bool RangeLock::try_acquire(Request* req) {
    insert(req);
    if (find_conflict(req) != nullptr) {
        remove(req);
        return false;
    }
    req->running_ = true;
    return true;
}

bool RangeLock::any_overlap(uint64_t offset, uint64_t bytes, const Request* self) const {
    for (Request* r = head_; r != nullptr; r = r->next_) {
        if (r != self && overlaps(r->offset_, r->bytes_, offset, bytes)) {
            return true;
        }
    }
    return false;
}

Task<void> RangeLock::wait_idle(uint64_t offset, uint64_t bytes) {
    for (;;) {
        Request* busy = nullptr;
        for (Request* r = head_; r != nullptr; r = r->next_) {
            if (overlaps(r->offset_, r->bytes_, offset, bytes)) {
                busy = r;
                break;
            }
        }
        if (busy == nullptr) {
            co_return;
        }
        co_await busy->waiters_.wait();
    }
}

}  // namespace imgfs
