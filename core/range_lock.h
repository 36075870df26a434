// RangeLock: tracking of in-flight byte ranges. One primitive serves three users: generic write
// serialisation (read-modify-write of unaligned requests), qcow2 cluster allocation (two writes
// to the same unallocated cluster must not both allocate) and mirror conflicts (a guest write
// and the copy of the same range must not interleave).
//
// Every tracked request is visible to the others from the moment it starts to acquire. Two
// requests conflict when they overlap and at least one of them is serialising.
//
// Deadlock rule: a request only ever waits for a running one (one whose acquire has returned)
// or for an older one, and a running request never waits. Every wait goes to a running request
// or down in age, so the wait-for graph has no cycles.
//
// Fairness: a request does not overtake an older request that conflicts with it and is still
// waiting. It waits for what that older request waits for (a running request), and as the
// older one was queued there first, it is woken first and runs first. Without this a
// serialising request (a job's copy of a range) could be overtaken by overlapping guest writes
// for as long as they keep coming. An older request that has been woken but not yet resumed
// waits for nothing at that moment; a newcomer then waits for that request itself, until it
// is released. A younger waiting request is passed over: it yields to us.
#pragma once

#include <cstdint>

#include "core/task.h"
#include "core/wait_queue.h"

namespace imgfs {

class RangeLock {
  public:
    explicit RangeLock(Executor* executor) : executor_(executor) {}
    RangeLock(const RangeLock&) = delete;
    RangeLock& operator=(const RangeLock&) = delete;
    ~RangeLock();

    /// One tracked range. Lives in the requester's coroutine frame; released by its destructor
    /// at the latest. Not movable: the lock links to it.
    class Request {
      public:
        Request(RangeLock* lock, uint64_t offset, uint64_t bytes, bool serialising);
        Request(const Request&) = delete;
        Request& operator=(const Request&) = delete;
        ~Request() { release(); }

        /// Leaves the tracking list and wakes anyone waiting for this request.
        void release();

        [[nodiscard]] uint64_t offset() const { return offset_; }
        [[nodiscard]] uint64_t bytes() const { return bytes_; }
        [[nodiscard]] bool serialising() const { return serialising_; }
        [[nodiscard]] bool tracked() const { return tracked_; }
        [[nodiscard]] const Request* waiting_for() const { return waiting_for_; }

      private:
        friend class RangeLock;
        RangeLock* lock_;
        uint64_t offset_;
        uint64_t bytes_;
        bool serialising_;
        bool tracked_ = false;
        bool running_ = false;  // acquired: conflicts wait for it
        uint64_t seq_ = 0;      // order of insertion: lower is older
        // The request it waits for (running, or older); cleared when that one is released (it may
        // be freed before this one resumes).
        Request* waiting_for_ = nullptr;
        Request* prev_ = nullptr;
        Request* next_ = nullptr;
        WaitQueue waiters_;
    };

    /// Starts tracking `req` and waits until no running request conflicts with it. `req` must
    /// outlive the wait and be released (or destroyed) by the same owner afterwards.
    Task<void> acquire(Request* req);

    /// Tracks `req` without waiting; returns false (and tracks nothing) if it would conflict.
    bool try_acquire(Request* req);

    /// True if some tracked request other than `self` overlaps [offset, offset+bytes).
    [[nodiscard]] bool any_overlap(uint64_t offset, uint64_t bytes, const Request* self) const;

    /// Waits until no tracked request overlaps the range (used to let in-flight writes finish
    /// before a range is copied; new requests are not held back).
    Task<void> wait_idle(uint64_t offset, uint64_t bytes);

    [[nodiscard]] size_t tracked_count() const { return count_; }

  private:
    void insert(Request* req);
    void remove(Request* req);
    Request* find_conflict(const Request* self) const;

    Executor* executor_;
    Request* head_ = nullptr;
    size_t count_ = 0;
    uint64_t next_seq_ = 0;
};

}  // namespace imgfs
