// Task<T> lifetimes: laziness, frame ownership, values through nested awaits, and no leaks or
// extra copies (a Counted type tracks constructions and destructions).
#include "core/task.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace imgfs {
namespace {

struct Counted {
    static inline int alive = 0;
    static inline int copies = 0;
    int value = 0;
    explicit Counted(int v) : value(v) { ++alive; }
    Counted(const Counted& o) : value(o.value) {
        ++alive;
        ++copies;
    }
    Counted(Counted&& o) noexcept : value(o.value) { ++alive; }
    Counted& operator=(const Counted&) = delete;
    Counted& operator=(Counted&&) = delete;
    ~Counted() { --alive; }
};

class TaskTest : public test::LoopTest {
  protected:
    void SetUp() override {
        LoopTest::SetUp();
        Counted::alive = 0;
        Counted::copies = 0;
    }
};

Task<int> answer(int* started) {
    ++*started;
    co_return 42;
}

TEST_F(TaskTest, IsLazy) {
    int started = 0;
    {
        Task<int> t = answer(&started);
        EXPECT_EQ(started, 0);
    }
    EXPECT_EQ(started, 0);  // destroyed without ever running
    EXPECT_EQ(run(answer(&started)), 42);
    EXPECT_EQ(started, 1);
}

Task<Counted> make_counted(Counted arg) {
    co_return Counted(arg.value + 1);
}

Task<int> consume(Counted c) {
    Counted r = co_await make_counted(std::move(c));
    co_return r.value;
}

TEST_F(TaskTest, FramesOwnArgumentsAndValues) {
    EXPECT_EQ(run(consume(Counted(1))), 2);
    EXPECT_EQ(Counted::alive, 0);
    EXPECT_EQ(Counted::copies, 0);
}

TEST_F(TaskTest, UnstartedTaskReleasesArguments) {
    {
        Task<int> t = consume(Counted(5));
        EXPECT_EQ(Counted::alive, 1);  // the argument copied into the frame
    }
    EXPECT_EQ(Counted::alive, 0);
}

Task<uint64_t> depth(uint64_t n) {
    if (n == 0) {
        co_return 0;
    }
    co_return 1 + co_await depth(n - 1);
}

TEST_F(TaskTest, DeepChainsDoNotGrowTheStack) {
    // Each await of a completed child returns by symmetric transfer; 200k levels would overflow
    // an 8 MiB stack if every resume nested.
    EXPECT_EQ(run(depth(200000)), 200000U);
}

Task<void> sleeper(EventLoop* loop, int* order, int id) {
    co_await loop->sleep(std::chrono::milliseconds(id));
    *order = *order * 10 + id;
}

Task<void> two_sleepers(EventLoop* loop, int* order) {
    co_await sleeper(loop, order, 2);
    co_await sleeper(loop, order, 1);
}

TEST_F(TaskTest, VoidTasksRunInOrder) {
    int order = 0;
    run(two_sleepers(loop_.get(), &order));
    EXPECT_EQ(order, 21);
}

TEST_F(TaskTest, MoveAssignDestroysOldFrame) {
    Task<int> a = consume(Counted(1));
    Task<int> b = consume(Counted(2));
    EXPECT_EQ(Counted::alive, 2);
    a = std::move(b);
    EXPECT_EQ(Counted::alive, 1);
    EXPECT_EQ(run(std::move(a)), 3);
    EXPECT_EQ(Counted::alive, 0);
}

}  // namespace
}  // namespace imgfs
