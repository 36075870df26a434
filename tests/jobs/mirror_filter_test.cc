// MirrorFilter: what reaches the commit target when guest writes overlap, complete out of order,
// fail part way, or straddle the switch to sync mode. After any of these the target must show
// what the top shows, or the range must be dirty (the job copies it again); otherwise the
// switch to the target at the end of a commit changes the disk under the guest.
#include "jobs/mirror_filter.h"

#include <chrono>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "core/transaction.h"
#include "core/wait_queue.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kSize = 1 << 20;

// A top layer that applies each write as it arrives but completes it only when the test says,
// in any order; and can fail a write after applying half of it (a write whose second cluster
// could not be allocated).
class ReorderingNode final : public Node {
  public:
    ReorderingNode(NodeEnv env, uint64_t size) : Node(env, "top"), data(size) {
        size_ = size;
        caps_.resize = true;
    }
    [[nodiscard]] const char* driver_name() const override { return "reordering"; }

    std::vector<uint8_t> data;
    std::vector<std::unique_ptr<AsyncEvent>> pending;  // one per write, in arrival order
    bool hold = true;
    bool fail_half = false;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override {
        std::memcpy(buf.data(), data.data() + offset, buf.size());
        co_return Status{};
    }
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override {
        const size_t n = fail_half ? buf.size() / 2 : buf.size();
        std::memcpy(data.data() + offset, buf.data(), n);
        if (hold) {
            pending.push_back(std::make_unique<AsyncEvent>(env_.loop));
            AsyncEvent* done = pending.back().get();
            co_await done->wait();
        }
        if (fail_half) {
            co_return make_error(ENOSPC, "top: no space for the rest");
        }
        co_return Status{};
    }
    Task<Status> do_flush() override { co_return Status{}; }
};

Task<void> guest_write(BlockBackend* be, uint64_t offset, uint64_t bytes, uint8_t fill,
                       Status* out) {
    std::vector<uint8_t> b(bytes, fill);
    *out = co_await be->write(offset, ConstBuf(b.data(), b.size()));
}

Task<void> join(TaskScope* s) {
    co_await s->join();
}

Task<void> wait_unmirrored(MirrorFilter* f, bool* done) {
    co_await f->wait_unmirrored_writes();
    *done = true;
}

class MirrorFilterTest : public test::LoopTest {
  protected:
    // Lets every runnable coroutine go as far as it can.
    void settle() {
        for (int i = 0; i < 20; ++i) {
            run(tick());
        }
    }
    Task<void> tick() { co_await loop_->sleep(std::chrono::microseconds(100)); }

    void SetUp() override {
        LoopTest::SetUp();
        top_ = std::make_shared<ReorderingNode>(env(), kSize);
        target_ = std::make_shared<test::MemNode>(env(), "target", kSize);
        guest_ = std::make_unique<BlockBackend>(loop_.get(), "vm");
        job_ = std::make_unique<BlockBackend>(loop_.get(), "job");
        Transaction tx(&graph_);
        filter_ = MirrorFilter::create(env(), "mirror", &tx, top_);
        guest_->attach(&tx, filter_, perm::kConsistentRead | perm::kWrite, perm::kConsistentRead);
        target_edge_ = tx.attach(job_.get(), target_, ChildRole::kUser, "target",
                                 perm::kConsistentRead | perm::kWrite, perm::kAll);
        ASSERT_TRUE(tx.commit().ok());
        filter_->set_dirty(&dirty_);
        filter_->set_target(target_edge_);
    }
    void TearDown() override {
        Transaction tx(&graph_);
        tx.detach(guest_->root());
        tx.detach(target_edge_);
        tx.detach(filter_->top());
        (void)tx.commit_removal();
        LoopTest::TearDown();
    }
    // The target agrees with the top wherever the range is clean.
    void expect_target_follows_top() {
        for (uint64_t off = 0; off < kSize; off += 4096) {
            if (!dirty_.test(off) &&
                std::memcmp(top_->data.data() + off, target_->data.data() + off, 4096) != 0) {
                ADD_FAILURE() << "at " << off << " the top shows " << int{top_->data[off]}
                              << ", the target " << int{target_->data[off]}
                              << ", and the range is clean";
                return;
            }
        }
    }

    std::shared_ptr<ReorderingNode> top_;
    std::shared_ptr<test::MemNode> target_;
    std::shared_ptr<MirrorFilter> filter_;
    std::unique_ptr<BlockBackend> guest_;
    std::unique_ptr<BlockBackend> job_;
    Child* target_edge_ = nullptr;
    DirtyBitmap dirty_{kSize, 65536};
};

// Two overlapping writes; the second one's top write completes first. Mirrored in completion
// order, the target would end with the first write's bytes while the top shows the second's.
TEST_F(MirrorFilterTest, OverlappingWritesReachTheTargetInTheTopsOrder) {
    filter_->set_mode(MirrorFilter::Mode::kSync);
    TaskScope scope(loop_.get());
    Status first;
    Status second;
    scope.spawn(guest_write(guest_.get(), 0, 8192, 1, &first));
    scope.spawn(guest_write(guest_.get(), 4096, 8192, 2, &second));
    settle();
    ASSERT_GE(top_->pending.size(), 1U);
    top_->pending.back()->set();  // the latest write the top took completes first
    settle();
    for (auto& p : top_->pending) {
        p->set();
    }
    top_->hold = false;
    run(join(&scope));
    ASSERT_TRUE(first.ok() && second.ok());
    expect_target_follows_top();
    EXPECT_EQ(dirty_.dirty_bytes(), 0U);
}

// A write that failed after part of it reached the top: the target must get that part too.
TEST_F(MirrorFilterTest, AFailedWriteLeavesItsRangeDirty) {
    filter_->set_mode(MirrorFilter::Mode::kSync);
    top_->hold = false;
    top_->fail_half = true;
    Status st;
    run(guest_write(guest_.get(), 65536, 8192, 7, &st));
    EXPECT_EQ(st.error().errnum, ENOSPC);
    EXPECT_EQ(top_->data[65536], 7);
    expect_target_follows_top();
    EXPECT_TRUE(dirty_.test(65536));
}

// Writes that began in async mode are not mirrored even if they end after the switch: they
// overlap sync writes without excluding them, so mirroring them could reorder the target.
// They mark their range dirty instead, and the job waits for them before its next pass.
TEST_F(MirrorFilterTest, WritesBegunBeforeTheSwitchEndDirtyAndAreWaitedFor) {
    filter_->set_mode(MirrorFilter::Mode::kAsync);
    TaskScope scope(loop_.get());
    Status async_write;
    Status sync_write;
    scope.spawn(guest_write(guest_.get(), 0, 4096, 3, &async_write));
    settle();
    ASSERT_EQ(top_->pending.size(), 1U);
    filter_->set_mode(MirrorFilter::Mode::kSync);
    bool waited = false;
    scope.spawn(wait_unmirrored(filter_.get(), &waited));
    scope.spawn(guest_write(guest_.get(), 0, 4096, 4, &sync_write));
    settle();
    EXPECT_FALSE(waited) << "the wait ended with an async write still running";
    EXPECT_EQ(top_->pending.size(), 1U) << "the sync write did not wait for the overlapping one";
    top_->hold = false;
    top_->pending[0]->set();
    run(join(&scope));
    EXPECT_TRUE(waited);
    ASSERT_TRUE(async_write.ok() && sync_write.ok());
    EXPECT_EQ(top_->data[0], 4);
    EXPECT_EQ(target_->data[0], 4);
    EXPECT_TRUE(dirty_.test(0)) << "the async write's range was not marked dirty";
}

}  // namespace
}  // namespace imgfs
