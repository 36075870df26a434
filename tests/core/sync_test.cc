// WaitQueue, AsyncEvent, CoMutex and TaskScope.
#include <gtest/gtest.h>

#include "core/co_mutex.h"
#include "core/task_scope.h"
#include "core/wait_queue.h"
#include "test_util.h"

namespace imgfs {
namespace {

class SyncTest : public test::LoopTest {};

Task<void> wait_then_record(WaitQueue* q, std::vector<int>* order, int id) {
    co_await q->wait();
    order->push_back(id);
}

Task<void> join(TaskScope* s) {
    co_await s->join();
}

TEST_F(SyncTest, WaitQueueWakesInFifoOrderThroughTheExecutor) {
    WaitQueue q(loop_.get());
    std::vector<int> order;
    TaskScope scope(loop_.get());
    for (int i = 0; i < 3; ++i) {
        scope.spawn(wait_then_record(&q, &order, i));
    }
    EXPECT_EQ(q.size(), 3U);
    q.notify_one();
    EXPECT_TRUE(order.empty());  // scheduled, not resumed inline
    q.notify_all();
    run(join(&scope));
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
}

Task<void> wait_event(AsyncEvent* e, int* hits) {
    co_await e->wait();
    ++*hits;
}

TEST_F(SyncTest, EventIsManualReset) {
    AsyncEvent e(loop_.get());
    int hits = 0;
    TaskScope scope(loop_.get());
    scope.spawn(wait_event(&e, &hits));
    scope.spawn(wait_event(&e, &hits));
    e.set();
    run(join(&scope));
    EXPECT_EQ(hits, 2);
    scope.spawn(wait_event(&e, &hits));  // already set: does not suspend
    EXPECT_EQ(hits, 3);
    run(join(&scope));
}

Task<void> critical(EventLoop* loop, CoMutex* m, int* inside, int* max_inside, int* done) {
    auto guard = co_await m->lock();
    ++*inside;
    *max_inside = std::max(*max_inside, *inside);
    co_await loop->sleep(std::chrono::milliseconds(1));
    --*inside;
    ++*done;
}

TEST_F(SyncTest, MutexExcludes) {
    CoMutex m(loop_.get());
    int inside = 0;
    int max_inside = 0;
    int done = 0;
    TaskScope scope(loop_.get());
    for (int i = 0; i < 20; ++i) {
        scope.spawn(critical(loop_.get(), &m, &inside, &max_inside, &done));
    }
    run(join(&scope));
    EXPECT_EQ(done, 20);
    EXPECT_EQ(max_inside, 1);
    EXPECT_FALSE(m.locked());
}

Task<void> sleep_ms(EventLoop* loop, int ms, int* done) {
    co_await loop->sleep(std::chrono::milliseconds(ms));
    ++*done;
}

TEST_F(SyncTest, ScopeJoinWaitsForEverySpawnedTask) {
    TaskScope scope(loop_.get());
    int done = 0;
    for (int i = 0; i < 10; ++i) {
        scope.spawn(sleep_ms(loop_.get(), i, &done));
    }
    EXPECT_EQ(scope.active(), 10U);
    run(join(&scope));
    EXPECT_EQ(done, 10);
    EXPECT_EQ(scope.active(), 0U);
}

}  // namespace
}  // namespace imgfs
