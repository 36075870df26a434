// InlineGate: the per-turn bound, the sleep budget per second, and the cool-offs after stalls.
#include "core/inline_gate.h"

#include <gtest/gtest.h>

namespace imgfs {
namespace {

using Clock = InlineGate::Clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

TEST(InlineGateTest, AtMostSoManyCallsPerTurn) {
    InlineGate gate;
    const Clock::time_point now = Clock::now();
    for (uint64_t i = 0; i < InlineGate::kCallsPerTurn; ++i) {
        ASSERT_TRUE(gate.may_go(now)) << i;
    }
    EXPECT_FALSE(gate.may_go(now));
    gate.new_turn();
    EXPECT_TRUE(gate.may_go(now));
}

TEST(InlineGateTest, ShortSleepsAddUpWithinASecond) {
    InlineGate gate;
    seconds cool_off{};
    Clock::time_point t = Clock::now();
    // 0.4 ms twice is within a 1 ms budget; a third sleep in the same second is not.
    EXPECT_FALSE(gate.slept(t, std::chrono::microseconds(400), milliseconds(1), &cool_off));
    EXPECT_FALSE(gate.slept(t + milliseconds(300), std::chrono::microseconds(400), milliseconds(1),
                            &cool_off));
    EXPECT_TRUE(gate.slept(t + milliseconds(600), std::chrono::microseconds(400), milliseconds(1),
                           &cool_off));
    EXPECT_EQ(cool_off, seconds(1));
    EXPECT_FALSE(gate.may_go(t + milliseconds(700)));
    EXPECT_TRUE(gate.may_go(t + milliseconds(1700)));
    EXPECT_EQ(gate.stalls(), 1U);
    // The same sleeps spread over seconds never add up.
    InlineGate spread;
    for (int i = 0; i < 10; ++i) {
        EXPECT_FALSE(spread.slept(t + seconds(2 * i), std::chrono::microseconds(900),
                                  milliseconds(1), &cool_off));
    }
}

TEST(InlineGateTest, CoolOffsDoubleInARowUpTo64SecondsAndAGapStartsAgain) {
    InlineGate gate;
    seconds cool_off{};
    Clock::time_point t = Clock::now();
    std::vector<long> seen;
    for (int i = 0; i < 9; ++i) {
        ASSERT_TRUE(gate.slept(t, milliseconds(5), milliseconds(1), &cool_off));
        seen.push_back(cool_off.count());
        t += cool_off + milliseconds(1);  // the next stall right after the cool-off
    }
    EXPECT_EQ(seen, (std::vector<long>{1, 2, 4, 8, 16, 32, 64, 64, 64}));
    t += InlineGate::kRowGap + seconds(1);
    ASSERT_TRUE(gate.slept(t, milliseconds(5), milliseconds(1), &cool_off));
    EXPECT_EQ(cool_off, seconds(1));
}

}  // namespace
}  // namespace imgfs
