// Drained sections: what a drain waits for below the drained nodes. It waits for their own
// layers (a request their driver sent down on its own), and not for a layer another image's
// overlay also reads through, which may never be idle while that image is busy.
#include "core/drain.h"

#include <gtest/gtest.h>

#include "core/backend.h"
#include "core/task_scope.h"
#include "core/transaction.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

using test::MemNode;

class DrainTest : public test::LoopTest {
  protected:
    static Task<void> drain_and_note(std::vector<std::shared_ptr<Node>> nodes, bool* done) {
        DrainGuard drained = co_await drain(std::move(nodes));
        *done = true;
    }
    static Task<void> read_through(Child* edge, bool* done) {
        std::vector<uint8_t> buf(4096);
        (void)co_await edge->read(0, buf);
        *done = true;
    }
    static Task<void> join(TaskScope* s) { co_await s->join(); }
    void ticks(int n) {
        for (int i = 0; i < n; ++i) {
            run(loop_->sleep(std::chrono::milliseconds(1)));
        }
    }
};

// vm1 and vm2 over one base; vm2 keeps a read in flight on the base (a busy image). A drain of
// vm1 completes anyway: before, it waited for the base to be idle, as long as vm2 was busy.
TEST_F(DrainTest, ALayerAnotherImageKeepsBusyDoesNotHoldTheDrainUp) {
    auto base = std::make_shared<MemNode>(env(), "base", 1 << 20);
    auto vm1 = std::make_shared<MemNode>(env(), "vm1", 1 << 20);
    auto vm2 = std::make_shared<MemNode>(env(), "vm2", 1 << 20);
    BlockBackend be1(loop_.get(), "vm1");
    BlockBackend be2(loop_.get(), "vm2");
    {
        Transaction tx(&graph_);
        tx.attach(vm1.get(), base, ChildRole::kBacking, "backing");
        tx.attach(vm2.get(), base, ChildRole::kBacking, "backing");
        be1.attach(&tx, vm1, perm::kConsistentRead, perm::kAll);
        be2.attach(&tx, vm2, perm::kConsistentRead, perm::kAll);
        ASSERT_TRUE(tx.commit().ok());
    }
    base->hold();
    TaskScope scope(loop_.get());
    bool read_done = false;
    scope.spawn(read_through(vm2->backing(), &read_done));  // vm2's read falling through
    ticks(2);
    ASSERT_EQ(base->in_flight(), 1U);
    bool drained = false;
    scope.spawn(drain_and_note({vm1}, &drained));
    ticks(5);
    EXPECT_TRUE(drained) << "the drain of vm1 waited for vm2's read on the shared base";
    EXPECT_FALSE(read_done);
    base->release();
    run(join(&scope));
    EXPECT_TRUE(read_done);
}

// A request vm1's driver sent to its own backing (not inside a request to vm1, as a
// write-back does) is still waited for: nothing else uses that layer.
TEST_F(DrainTest, ARequestOnALayerOnlyTheDrainedNodeUsesIsWaitedFor) {
    auto below = std::make_shared<MemNode>(env(), "below", 1 << 20);
    auto vm1 = std::make_shared<MemNode>(env(), "vm1", 1 << 20);
    BlockBackend be1(loop_.get(), "vm1");
    {
        Transaction tx(&graph_);
        tx.attach(vm1.get(), below, ChildRole::kBacking, "backing");
        be1.attach(&tx, vm1, perm::kConsistentRead, perm::kAll);
        ASSERT_TRUE(tx.commit().ok());
    }
    below->hold();
    TaskScope scope(loop_.get());
    bool read_done = false;
    scope.spawn(read_through(vm1->backing(), &read_done));
    ticks(2);
    bool drained = false;
    scope.spawn(drain_and_note({vm1}, &drained));
    ticks(5);
    EXPECT_FALSE(drained) << "the drain ended with a request in flight below vm1";
    below->release();
    run(join(&scope));
    EXPECT_TRUE(read_done);
    EXPECT_TRUE(drained);
}

}  // namespace
}  // namespace imgfs
