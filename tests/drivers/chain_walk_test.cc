// The chain walk's rules on their own: loops by identity (not by name), and the depth limit.
#include "drivers/chain_walk.h"

#include <gtest/gtest.h>

namespace imgfs {
namespace {

FileId id(ino_t ino) {
    return {dev_t{1}, ino};
}

TEST(ChainWalkTest, DistinctLayersPass) {
    ChainWalk walk("top.qcow2");
    EXPECT_TRUE(walk.enter("top.qcow2", id(1)).ok());
    EXPECT_TRUE(walk.enter("mid.qcow2", id(2)).ok());
    EXPECT_TRUE(walk.enter("base.raw", id(3)).ok());
    EXPECT_EQ(walk.depth(), 3U);
    EXPECT_TRUE(walk.check_depth().ok());
}

TEST(ChainWalkTest, SelfLoop) {
    ChainWalk walk("self.qcow2");
    ASSERT_TRUE(walk.enter("self.qcow2", id(7)).ok());
    Status st = walk.enter("self.qcow2", id(7));
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, ELOOP);
    EXPECT_EQ(st.error().context, "the backing chain loops (self.qcow2 -> self.qcow2)");
}

TEST(ChainWalkTest, LoopBelowTheTopUnderAnotherName) {
    // x and its hard link y are one file: entering y after x is a loop although the names
    // differ.
    ChainWalk walk("top.qcow2");
    ASSERT_TRUE(walk.enter("top.qcow2", id(1)).ok());
    ASSERT_TRUE(walk.enter("x.qcow2", id(2)).ok());
    Status st = walk.enter("y.qcow2", id(2));
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().context, "the backing chain loops (top.qcow2 -> x.qcow2 -> y.qcow2)");
}

TEST(ChainWalkTest, SameInodeOnAnotherDeviceIsAnotherFile) {
    ChainWalk walk("a");
    ASSERT_TRUE(walk.enter("a", {dev_t{1}, 5}).ok());
    EXPECT_TRUE(walk.enter("b", {dev_t{2}, 5}).ok());
}

TEST(ChainWalkTest, DepthLimit) {
    ChainWalk walk("deep3", 3);
    for (ino_t i = 0; i < 3; ++i) {
        ASSERT_TRUE(walk.room_for_more());
        ASSERT_TRUE(walk.check_depth().ok());
        ASSERT_TRUE(walk.enter("l" + std::to_string(i), id(i + 1)).ok());
    }
    EXPECT_FALSE(walk.room_for_more());
    Status st = walk.check_depth();
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, ELOOP);
    EXPECT_EQ(st.error().context, "backing chain of 'deep3' is deeper than 3 layers");
}

TEST(ChainWalkTest, DefaultLimitIsTheContractsSixtyFour) {
    ChainWalk walk("top");
    for (ino_t i = 0; i < 64; ++i) {
        ASSERT_TRUE(walk.enter("l", id(i + 1)).ok());
    }
    EXPECT_FALSE(walk.room_for_more());
    EXPECT_FALSE(walk.check_depth().ok());
}

}  // namespace
}  // namespace imgfs
