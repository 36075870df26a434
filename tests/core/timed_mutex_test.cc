// TimedMutex: exclusion, FIFO hand-over, bounded waits that give up (and leave the queue), and
// a timer task that ends once nobody waits.
#include "core/timed_mutex.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace imgfs {
namespace {

using std::chrono::milliseconds;

class TimedMutexTest : public test::LoopTest {
  protected:
    static Task<void> join(TaskScope* s) { co_await s->join(); }
};

Task<void> hold_for(TimedMutex* m, EventLoop* loop, milliseconds ms, std::vector<int>* order,
                    int id) {
    TimedMutex::Guard g = co_await m->lock();
    order->push_back(id);
    co_await loop->sleep(ms);
}

Task<void> try_for(TimedMutex* m, milliseconds wait, std::vector<int>* order, int id, bool* got) {
    std::optional<TimedMutex::Guard> g = co_await m->lock_for(wait);
    *got = g.has_value();
    if (*got) {
        order->push_back(id);
    }
}

TEST_F(TimedMutexTest, HandsOverInFifoOrderAndExcludes) {
    TaskScope timers(loop_.get());
    TimedMutex m(loop_.get(), &timers);
    std::vector<int> order;
    TaskScope scope(loop_.get());
    for (int i = 0; i < 5; ++i) {
        scope.spawn(hold_for(&m, loop_.get(), milliseconds(2), &order, i));
    }
    EXPECT_TRUE(m.locked());
    EXPECT_EQ(m.waiters(), 4U);
    run(join(&scope));
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4}));
    EXPECT_FALSE(m.locked());
    run(join(&timers));
}

TEST_F(TimedMutexTest, BoundedWaitGivesUpAndLeavesTheQueue) {
    TaskScope timers(loop_.get());
    TimedMutex m(loop_.get(), &timers);
    std::vector<int> order;
    bool short_got = true;
    bool long_got = false;
    TaskScope scope(loop_.get());
    auto start = std::chrono::steady_clock::now();
    scope.spawn(hold_for(&m, loop_.get(), milliseconds(300), &order, 0));
    scope.spawn(try_for(&m, milliseconds(50), &order, 1, &short_got));
    scope.spawn(try_for(&m, milliseconds(5000), &order, 2, &long_got));
    run(join(&scope));
    auto took = std::chrono::steady_clock::now() - start;
    EXPECT_FALSE(short_got);  // gave up while the holder slept
    EXPECT_TRUE(long_got);    // got it when the holder was done, not at its deadline
    EXPECT_EQ(order, (std::vector<int>{0, 2}));
    EXPECT_LT(took, milliseconds(2000));
    EXPECT_FALSE(m.locked());
    EXPECT_EQ(m.waiters(), 0U);
    run(join(&timers));  // the timer task ended with the last bounded waiter
    EXPECT_EQ(timers.active(), 0U);
}

TEST_F(TimedMutexTest, TryLockAndGuardRelease) {
    TaskScope timers(loop_.get());
    TimedMutex m(loop_.get(), &timers);
    std::optional<TimedMutex::Guard> a = m.try_lock();
    ASSERT_TRUE(a.has_value());
    EXPECT_FALSE(m.try_lock().has_value());
    a->release();
    EXPECT_FALSE(m.locked());
    std::optional<TimedMutex::Guard> b = m.try_lock();
    EXPECT_TRUE(b.has_value());
    TimedMutex::Guard moved = std::move(*b);
    EXPECT_TRUE(moved.owns());
    EXPECT_FALSE(b->owns());
    EXPECT_TRUE(m.locked());
}

TEST_F(TimedMutexTest, GuardMayOutliveTheMutex) {
    TaskScope timers(loop_.get());
    std::optional<TimedMutex::Guard> g;
    {
        TimedMutex m(loop_.get(), &timers);
        g = m.try_lock();
    }
    g->release();  // the shared state is still there
    EXPECT_FALSE(g->owns());
}

}  // namespace
}  // namespace imgfs
