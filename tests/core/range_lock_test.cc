// RangeLock: conflicts, mutual exclusion, and the deadlock scenarios its rule exists for.
#include "core/range_lock.h"

#include <random>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "test_util.h"

namespace imgfs {
namespace {

struct Active {
    uint64_t offset;
    uint64_t bytes;
    bool serialising;
};

// Records who holds what, and fails the test if two conflicting requests ever run together.
struct Tracker {
    std::vector<Active> active;
    int completed = 0;
    bool violation = false;

    void enter(Active a) {
        for (const Active& b : active) {
            bool overlap = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
            if (overlap && (a.serialising || b.serialising)) {
                violation = true;
            }
        }
        active.push_back(a);
    }
    void leave(Active a) {
        for (auto it = active.begin(); it != active.end(); ++it) {
            if (it->offset == a.offset && it->bytes == a.bytes &&
                it->serialising == a.serialising) {
                active.erase(it);
                break;
            }
        }
        ++completed;
    }
};

Task<void> hold_range(EventLoop* loop, RangeLock* lock, Tracker* t, Active a, int hold_ms) {
    RangeLock::Request req(lock, a.offset, a.bytes, a.serialising);
    co_await lock->acquire(&req);
    t->enter(a);
    co_await loop->sleep(std::chrono::milliseconds(hold_ms));
    t->leave(a);
}

class RangeLockTest : public test::LoopTest {};

Task<void> run_all(TaskScope* scope) {
    co_await scope->join();
}

TEST_F(RangeLockTest, NonSerialisingRequestsRunTogether) {
    RangeLock lock(loop_.get());
    Tracker t;
    TaskScope scope(loop_.get());
    for (int i = 0; i < 8; ++i) {
        scope.spawn(hold_range(loop_.get(), &lock, &t, {0, 4096, false}, 20));
    }
    EXPECT_EQ(t.active.size(), 8U);  // all acquired without waiting
    run(run_all(&scope));
    EXPECT_EQ(t.completed, 8);
    EXPECT_FALSE(t.violation);
    EXPECT_EQ(lock.tracked_count(), 0U);
}

TEST_F(RangeLockTest, SerialisingWaitsForOverlapOnly) {
    RangeLock lock(loop_.get());
    Tracker t;
    TaskScope scope(loop_.get());
    scope.spawn(hold_range(loop_.get(), &lock, &t, {0, 100, false}, 30));
    scope.spawn(hold_range(loop_.get(), &lock, &t, {50, 100, true}, 10));   // waits
    scope.spawn(hold_range(loop_.get(), &lock, &t, {200, 100, true}, 10));  // disjoint: runs
    EXPECT_EQ(t.active.size(), 2U);
    run(run_all(&scope));
    EXPECT_EQ(t.completed, 3);
    EXPECT_FALSE(t.violation);
}

// X holds [0,10). A wants [5,15) and waits for X. B wants [10,20). Under a naive rule B would
// wait for A (they overlap) and A, on waking, would wait for B: a cycle. The rule "never wait
// for a waiter" lets B go ahead; A then waits for B, and everything finishes.
TEST_F(RangeLockTest, NoDeadlockWhenWaitingOnAWaiter) {
    RangeLock lock(loop_.get());
    Tracker t;
    TaskScope scope(loop_.get());
    scope.spawn(hold_range(loop_.get(), &lock, &t, {0, 10, true}, 20));   // X
    scope.spawn(hold_range(loop_.get(), &lock, &t, {5, 10, true}, 5));    // A
    scope.spawn(hold_range(loop_.get(), &lock, &t, {10, 10, true}, 20));  // B
    run(run_all(&scope));
    EXPECT_EQ(t.completed, 3);
    EXPECT_FALSE(t.violation);
}

// A long chain where each request overlaps its neighbours and all are serialising.
TEST_F(RangeLockTest, OverlappingChainCompletes) {
    RangeLock lock(loop_.get());
    Tracker t;
    TaskScope scope(loop_.get());
    for (uint64_t i = 0; i < 50; ++i) {
        scope.spawn(hold_range(loop_.get(), &lock, &t, {i * 10, 15, true}, 1));
    }
    run(run_all(&scope));
    EXPECT_EQ(t.completed, 50);
    EXPECT_FALSE(t.violation);
}

TEST_F(RangeLockTest, RandomMixKeepsMutualExclusion) {
    RangeLock lock(loop_.get());
    Tracker t;
    TaskScope scope(loop_.get());
    std::mt19937_64 rng(7);
    for (int i = 0; i < 300; ++i) {
        uint64_t off = rng() % 1000;
        uint64_t len = 1 + rng() % 200;
        bool ser = rng() % 3 == 0;
        scope.spawn(
            hold_range(loop_.get(), &lock, &t, {off, len, ser}, static_cast<int>(rng() % 3)));
    }
    run(run_all(&scope));
    EXPECT_EQ(t.completed, 300);
    EXPECT_FALSE(t.violation);
    EXPECT_EQ(lock.tracked_count(), 0U);
}

TEST_F(RangeLockTest, TryAcquireAndWaitIdle) {
    RangeLock lock(loop_.get());
    RangeLock::Request a(&lock, 0, 10, true);
    EXPECT_TRUE(lock.try_acquire(&a));
    RangeLock::Request b(&lock, 5, 10, false);
    EXPECT_FALSE(lock.try_acquire(&b));
    EXPECT_FALSE(b.tracked());
    EXPECT_TRUE(lock.any_overlap(9, 1, nullptr));
    EXPECT_FALSE(lock.any_overlap(10, 5, nullptr));
    a.release();
    EXPECT_TRUE(lock.try_acquire(&b));
    b.release();
}

// A range in the last block of the 64-bit address space ends at 2^64: its end must not wrap
// to 0 and make it overlap nothing.
TEST_F(RangeLockTest, ARangeEndingAtTheTopOfTheAddressSpaceStillConflicts) {
    RangeLock lock(loop_.get());
    RangeLock::Request top(&lock, UINT64_MAX - 4095, 4096, true);
    EXPECT_TRUE(lock.try_acquire(&top));
    RangeLock::Request inside(&lock, UINT64_MAX - 100, 50, true);
    EXPECT_FALSE(lock.try_acquire(&inside));
    EXPECT_TRUE(lock.any_overlap(UINT64_MAX - 10, 5, nullptr));
    EXPECT_FALSE(lock.any_overlap(0, 4096, nullptr));
    top.release();
    EXPECT_TRUE(lock.try_acquire(&inside));
    inside.release();
}

// Acquires `r`, checks that the serialising request before it has completed, releases.
Task<void> acquire_after(RangeLock* lock, RangeLock::Request* r, Tracker* t, bool* ran) {
    co_await lock->acquire(r);
    EXPECT_EQ(t->completed, 1);
    *ran = true;
    r->release();
}

// A serialising request waiting behind a running write is not overtaken by newer overlapping
// writes: they queue behind it. Before, each newcomer passed it (it was "a waiter"), so a job's
// copy of a range under steady overlapping guest writes waited for as long as they came.
TEST_F(RangeLockTest, AWaitingSerialisingRequestIsNotOvertaken) {
    RangeLock lock(loop_.get());
    RangeLock::Request first(&lock, 0, 4096, false);
    ASSERT_TRUE(lock.try_acquire(&first));
    Tracker t;
    TaskScope scope(loop_.get());
    scope.spawn(hold_range(loop_.get(), &lock, &t, {0, 4096, true}, 1));  // waits for `first`
    EXPECT_TRUE(t.active.empty());
    RangeLock::Request newer(&lock, 1024, 1024, false);
    EXPECT_FALSE(lock.try_acquire(&newer));
    RangeLock::Request younger_waiter(&lock, 2048, 4096, false);
    bool younger_ran = false;
    scope.spawn(acquire_after(&lock, &younger_waiter, &t, &younger_ran));
    EXPECT_FALSE(younger_ran);
    first.release();
    run(run_all(&scope));
    EXPECT_TRUE(younger_ran);
    EXPECT_EQ(t.completed, 1);
    EXPECT_FALSE(t.violation);
    EXPECT_EQ(lock.tracked_count(), 0U);
}

// A waiter that has been woken but has not run yet is not passed either. Before, a newcomer
// arriving in that gap found it waiting for nothing and went first; the waiter then woke to a
// new conflict, and a stream of such newcomers could keep it out without end.
TEST_F(RangeLockTest, AWokenWaiterIsNotPassedBeforeItRuns) {
    RangeLock lock(loop_.get());
    RangeLock::Request first(&lock, 0, 4096, false);
    ASSERT_TRUE(lock.try_acquire(&first));
    Tracker t;
    TaskScope scope(loop_.get());
    scope.spawn(hold_range(loop_.get(), &lock, &t, {0, 4096, true}, 1));  // waits for `first`
    first.release();  // the serialising request is woken, not yet resumed
    RangeLock::Request newcomer(&lock, 1024, 1024, false);
    EXPECT_FALSE(lock.try_acquire(&newcomer));
    RangeLock::Request waiting_newcomer(&lock, 0, 512, false);
    bool newcomer_ran = false;
    scope.spawn(acquire_after(&lock, &waiting_newcomer, &t, &newcomer_ran));
    EXPECT_FALSE(newcomer_ran);
    run(run_all(&scope));
    EXPECT_TRUE(newcomer_ran);  // and it ran after the serialising request (acquire_after checks)
    EXPECT_FALSE(t.violation);
    EXPECT_EQ(lock.tracked_count(), 0U);
}

Task<void> overlapping_writes(EventLoop* loop, RangeLock* lock, Tracker* t, TaskScope* scope,
                              int count) {
    for (int i = 0; i < count; ++i) {
        scope->spawn(hold_range(loop, lock, t, {0, 4096, false}, 5));
        co_await loop->sleep(std::chrono::milliseconds(2));
    }
}

Task<void> timed_hold(EventLoop* loop, RangeLock* lock, Tracker* t, Active a,
                      std::chrono::steady_clock::duration* waited) {
    co_await loop->sleep(std::chrono::milliseconds(1));
    const auto start = std::chrono::steady_clock::now();
    RangeLock::Request req(lock, a.offset, a.bytes, a.serialising);
    co_await lock->acquire(&req);
    *waited = std::chrono::steady_clock::now() - start;
    t->enter(a);
    t->leave(a);
}

// The same with a steady stream of overlapping writes (a new one every 2 ms, each held 5 ms, so
// two or three always run): the serialising request gets in within a few of them.
TEST_F(RangeLockTest, ASerialisingRequestGetsInUnderAStreamOfOverlappingWrites) {
    RangeLock lock(loop_.get());
    Tracker t;
    TaskScope scope(loop_.get());
    std::chrono::steady_clock::duration waited{};
    // 400 writes: a request starved by them would wait the whole 800 ms of the stream, which a
    // stall of a loaded test machine does not reach.
    scope.spawn(overlapping_writes(loop_.get(), &lock, &t, &scope, 400));
    scope.spawn(timed_hold(loop_.get(), &lock, &t, {0, 4096, true}, &waited));
    run(run_all(&scope));
    EXPECT_FALSE(t.violation);
    EXPECT_EQ(t.completed, 401);
    EXPECT_LT(waited, std::chrono::milliseconds(400));
}

}  // namespace
}  // namespace imgfs
