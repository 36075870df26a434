// The fault-injection filter's rules: operation, errno, once/always, nth, offset range, drop.
#include "drivers/fault.h"

#include <gtest/gtest.h>

#include "core/transaction.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

using test::MemNode;

class FaultTest : public test::LoopTest {
  protected:
    void SetUp() override {
        LoopTest::SetUp();
        mem_ = std::make_shared<MemNode>(env(), "mem", 1 << 20);
        Transaction tx(&graph_);
        fault_ = FaultNode::open(env(), "fault", &tx, mem_);
        ASSERT_TRUE(tx.commit().ok());
        use_rw(fault_);
    }
    Status write_at(uint64_t off, uint8_t v = 1) {
        std::vector<uint8_t> d(512, v);
        return run(fault_->write(off, d));
    }

    std::shared_ptr<MemNode> mem_;
    std::shared_ptr<FaultNode> fault_;
};

TEST_F(FaultTest, NthWriteFailsOnceThenWritesWork) {
    size_t r = fault_->add_rule(FaultRule{fault_op::kWrite, EIO, true, 3});
    EXPECT_TRUE(write_at(0).ok());
    EXPECT_TRUE(write_at(512).ok());
    Status st = write_at(1024);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EIO);
    EXPECT_EQ(mem_->data[1024], 0);  // the failed write did not reach the child
    EXPECT_TRUE(write_at(1536).ok());
    EXPECT_TRUE(write_at(1024).ok());  // retry works
    EXPECT_EQ(fault_->fired(r), 1U);
    std::vector<uint8_t> buf(512);
    EXPECT_TRUE(run(fault_->read(0, buf)).ok());  // reads were never affected
}

TEST_F(FaultTest, AlwaysKeepsFiringWithItsErrno) {
    fault_->add_rule(FaultRule{fault_op::kWrite, ENOSPC, false, 2});
    EXPECT_TRUE(write_at(0).ok());
    for (int i = 0; i < 3; ++i) {
        Status st = write_at(512);
        ASSERT_FALSE(st.ok());
        EXPECT_EQ(st.error().errnum, ENOSPC);
    }
}

TEST_F(FaultTest, OffsetRangeLimitsTheRule) {
    FaultRule rule{fault_op::kAny, EIO, false, 1};
    rule.offset = 4096;
    rule.bytes = 4096;
    fault_->add_rule(rule);
    EXPECT_TRUE(write_at(0).ok());
    EXPECT_TRUE(write_at(8192).ok());
    EXPECT_FALSE(write_at(4096 + 512).ok());
    EXPECT_FALSE(write_at(4096 - 256).ok());  // overlaps the range's start
    std::vector<uint8_t> buf(512);
    EXPECT_FALSE(run(fault_->read(4096, buf)).ok());
    EXPECT_TRUE(run(fault_->flush()).ok());  // flush has no range: a ranged rule ignores it
}

TEST_F(FaultTest, FlushRule) {
    fault_->add_rule(FaultRule{fault_op::kFlush, EIO, true, 1});
    EXPECT_FALSE(run(fault_->flush()).ok());
    EXPECT_TRUE(run(fault_->flush()).ok());
}

TEST_F(FaultTest, DropLosesWritesSilently) {
    FaultRule rule{fault_op::kAllWrites | fault_op::kFlush, 0, false, 3};
    rule.action = FaultAction::kDrop;
    fault_->add_rule(rule);
    EXPECT_TRUE(write_at(0, 9).ok());
    EXPECT_TRUE(write_at(512, 9).ok());
    EXPECT_TRUE(write_at(1024, 9).ok());  // reported done, but lost
    EXPECT_TRUE(run(fault_->flush()).ok());
    EXPECT_EQ(mem_->data[512], 9);
    EXPECT_EQ(mem_->data[1024], 0);
    EXPECT_EQ(fault_->count(fault_op::kWrite), 3U);
}

}  // namespace
}  // namespace imgfs
