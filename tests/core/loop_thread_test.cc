// LoopThread and EventLoop::resume_on: coroutines hop between loops on different threads.
#include "core/loop_thread.h"

#include <unistd.h>
#include <vector>

#include <gtest/gtest.h>
#include <sys/syscall.h>

#include "core/task_scope.h"
#include "test_util.h"

namespace imgfs {
namespace {

class LoopThreadTest : public test::LoopTest {};

// The thread's id from the kernel. Not std::this_thread::get_id(): pthread_self() is declared
// const, so a compiler may call it once per coroutine body and reuse the value across a hop
// (clang does).
pid_t thread_id() {
    return static_cast<pid_t>(::syscall(SYS_gettid));
}

struct BounceLog {
    pid_t home_id = 0;
    pid_t away_id = 0;
    int wrong_thread = 0;  // checked on each side of a hop
    int finished = 0;
};

// Hops away and back `rounds` times; each side also does I/O (a timer) on its own loop, as the
// FUSE ring entries do with their commands.
Task<void> bounce(EventLoop* home, EventLoop* away, int rounds, BounceLog* log) {
    for (int i = 0; i < rounds; ++i) {
        co_await home->resume_on(away);
        pid_t there = thread_id();
        if (i % 64 == 0) {
            co_await away->sleep(std::chrono::microseconds(10));
        }
        co_await away->resume_on(home);
        // Written only on the home thread.
        log->away_id = there;
        if (there == log->home_id || thread_id() != log->home_id) {
            ++log->wrong_thread;
        }
    }
    ++log->finished;
}

Task<void> bounce_all(EventLoop* home, EventLoop* away, int coroutines, int rounds,
                      BounceLog* log) {
    TaskScope scope(home);
    for (int i = 0; i < coroutines; ++i) {
        scope.spawn(bounce(home, away, rounds, log));
    }
    co_await scope.join();
}

TEST_F(LoopThreadTest, CoroutinesHopToAnotherThreadAndBack) {
    auto away = LoopThread::start(EventLoop::Options{}, "test-loop");
    ASSERT_TRUE(away.ok()) << away.error().message();
    BounceLog log;
    log.home_id = thread_id();
    // While coroutines are away nothing may be in flight here.
    loop_->hold_for_posts(1);
    run(bounce_all(loop_.get(), (*away)->loop(), 16, 2000, &log));
    loop_->hold_for_posts(-1);
    EXPECT_EQ(log.finished, 16);
    EXPECT_EQ(log.wrong_thread, 0);
    EXPECT_NE(log.away_id, log.home_id);
    EXPECT_GE(loop_->hops_received(), 16U * 2000U);
}

TEST_F(LoopThreadTest, HopToTheSameLoopContinuesAtOnce) {
    BounceLog log;
    log.home_id = thread_id();
    run(bounce(loop_.get(), loop_.get(), 10, &log));
    // No hop at all: the "away" side is this thread.
    EXPECT_EQ(log.wrong_thread, 10);
    EXPECT_EQ(loop_->hops_received(), 0U);
}

TEST_F(LoopThreadTest, StopsWithNothingHandedToIt) {
    for (int i = 0; i < 20; ++i) {
        auto t = LoopThread::start(EventLoop::Options{}, "test-idle");
        ASSERT_TRUE(t.ok()) << t.error().message();
    }
}

}  // namespace
}  // namespace imgfs
