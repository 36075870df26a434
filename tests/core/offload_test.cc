// Offloader: work runs on another thread while the loop keeps serving, and the caller resumes on
// the loop thread with the result.
#include "core/offload.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "test_util.h"

namespace imgfs {
namespace {

class OffloadTest : public test::LoopTest {};

Task<void> blocking_call(Offloader* off, std::atomic<bool>* release, std::thread::id* ran_on,
                         std::thread::id* resumed_on, int* result) {
    std::function<int()> work = [release, ran_on] {
        *ran_on = std::this_thread::get_id();
        while (!release->load()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        return 42;
    };
    *result = co_await off->run<int>(std::move(work));
    *resumed_on = std::this_thread::get_id();
}

Task<void> ticker(EventLoop* loop, std::atomic<bool>* release, int* ticks) {
    // The loop keeps running other coroutines while the worker blocks.
    for (int i = 0; i < 10; ++i) {
        co_await loop->sleep(std::chrono::milliseconds(1));
        ++*ticks;
    }
    release->store(true);
}

Task<void> join(TaskScope* s) {
    co_await s->join();
}

TEST_F(OffloadTest, LoopServesWhileTheWorkerBlocks) {
    Offloader off(loop_.get());
    std::atomic<bool> release{false};
    std::thread::id ran_on;
    std::thread::id resumed_on;
    int result = 0;
    int ticks = 0;
    TaskScope scope(loop_.get());
    scope.spawn(blocking_call(&off, &release, &ran_on, &resumed_on, &result));
    scope.spawn(ticker(loop_.get(), &release, &ticks));
    run(join(&scope));
    EXPECT_EQ(result, 42);
    EXPECT_EQ(ticks, 10);
    EXPECT_NE(ran_on, std::this_thread::get_id());
    EXPECT_EQ(resumed_on, std::this_thread::get_id());
    EXPECT_EQ(off.completed(), 1U);
}

Task<Status> failing(Offloader* off) {
    std::function<Status()> work = [] { return Status(make_error(ENOENT, "gone")); };
    co_return co_await off->run<Status>(std::move(work));
}

TEST_F(OffloadTest, CarriesErrorsAndManyCalls) {
    Offloader off(loop_.get());
    for (int i = 0; i < 100; ++i) {
        Status st = run(failing(&off));
        ASSERT_FALSE(st.ok());
        EXPECT_EQ(st.error().errnum, ENOENT);
    }
    EXPECT_EQ(off.completed(), 100U);
}

TEST_F(OffloadTest, HandedOverWorkRunsOffTheLoopBeforeTheOffloaderGoes) {
    std::atomic<int> ran{0};
    std::thread::id ran_on;
    std::atomic<bool> release{false};  // outlives the Offloader, whose worker reads it
    {
        Offloader off(loop_.get());
        // Holds the worker, so the handed-over work is still queued when the Offloader goes.
        off.hand_over([&release] {
            while (!release) {
                std::this_thread::yield();
            }
        });
        off.hand_over([&ran, &ran_on] {
            ran_on = std::this_thread::get_id();
            ++ran;
        });
        EXPECT_EQ(ran, 0);
        release = true;
    }
    EXPECT_EQ(ran, 1);
    EXPECT_NE(ran_on, std::this_thread::get_id());
}

}  // namespace
}  // namespace imgfs
