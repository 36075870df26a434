// BlockBackend: block status goes through the backend like I/O (it waits while a drained section
// holds the chain and looks through a job's filter), and a fenced backend refuses everything.
#include "core/backend.h"

#include <gtest/gtest.h>

#include "core/chain_status.h"
#include "core/drain.h"
#include "core/task_scope.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

// A layer that holds nothing itself: everything shows through from its backing layer.
class EmptyLayer final : public Node {
  public:
    EmptyLayer(NodeEnv env, uint64_t size) : Node(env, "empty") {
        size_ = size;
        caps_.block_status = true;
    }
    [[nodiscard]] const char* driver_name() const override { return "empty"; }

  protected:
    Task<Status> do_read(uint64_t, MutBuf) override { co_return Status{}; }
    Task<Status> do_write(uint64_t, ConstBuf) override { co_return Status{}; }
    Task<Status> do_flush() override { co_return Status{}; }
    Task<Result<BlockStatus>> do_block_status(uint64_t, uint64_t bytes) override {
        co_return BlockStatus{Alloc::kUnallocated, bytes};
    }
};

// A filter over one child, as a job puts over the top layer.
class PassFilter final : public Node {
  public:
    PassFilter(NodeEnv env, uint64_t size) : Node(env, "filter") {
        size_ = size;
        caps_.block_status = true;
    }
    [[nodiscard]] const char* driver_name() const override { return "pass"; }

  protected:
    Task<Status> do_read(uint64_t o, MutBuf b) override {
        co_return co_await child(ChildRole::kFiltered)->read(o, b);
    }
    Task<Status> do_write(uint64_t, ConstBuf) override { co_return Status{}; }
    Task<Status> do_flush() override { co_return Status{}; }
    Task<Result<BlockStatus>> do_block_status(uint64_t o, uint64_t bytes) override {
        co_return co_await child(ChildRole::kFiltered)->block_status(o, bytes);
    }
};

// A layer whose storage must be claimed before its first write (as an RBD image takes its
// cluster lock), the claim suspending until the test lets it finish.
class ClaimedLayer final : public Node {
  public:
    ClaimedLayer(NodeEnv env, uint64_t size) : Node(env, "claimed") { size_ = size; }
    [[nodiscard]] const char* driver_name() const override { return "claimed"; }
    [[nodiscard]] bool claim_pending() const override { return pending_; }
    Task<Result<bool>> claim_writes() override {
        ++claims_started;
        while (!let_claim_finish) {
            co_await env_.loop->sleep(std::chrono::milliseconds(1));
        }
        pending_ = false;
        ++claims_finished;
        co_return true;
    }
    bool let_claim_finish = false;
    int claims_started = 0;
    int claims_finished = 0;
    int writes = 0;

  protected:
    Task<Status> do_read(uint64_t, MutBuf) override { co_return Status{}; }
    Task<Status> do_write(uint64_t, ConstBuf) override {
        ++writes;
        co_return Status{};
    }
    Task<Status> do_flush() override { co_return Status{}; }

  private:
    bool pending_ = true;
};

class BackendTest : public test::LoopTest {
  protected:
    static Task<void> status_of(BlockBackend* be, Result<ChainStatus>* out, bool* done) {
        *out = co_await be->block_status_above(0, 4096);
        *done = true;
    }
    static Task<void> join(TaskScope* s) { co_await s->join(); }
    static Task<void> write_and_note(BlockBackend* be, ConstBuf buf, Status* out, bool* done) {
        *out = co_await be->write(0, buf);
        *done = true;
    }
    Task<void> tick() { co_await loop_->sleep(std::chrono::milliseconds(1)); }
};

TEST_F(BackendTest, BlockStatusLooksThroughAFilterToTheBacking) {
    auto base = std::make_shared<test::MemNode>(env(), "base", 1 << 20);
    auto top = std::make_shared<EmptyLayer>(env(), 1 << 20);
    auto filter = std::make_shared<PassFilter>(env(), 1 << 20);
    BlockBackend be(loop_.get(), "vm");
    Transaction tx(&graph_);
    tx.attach(top.get(), base, ChildRole::kBacking, "backing");
    tx.attach(filter.get(), top, ChildRole::kFiltered, "filtered");
    be.attach(&tx, filter, perm::kConsistentRead, perm::kAll);
    ASSERT_TRUE(tx.commit().ok());
    Result<ChainStatus> st = Error{};
    bool done = false;
    run(status_of(&be, &st, &done));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_TRUE(st->data);  // the base's data, not zeros for want of a backing on the filter
    EXPECT_EQ(st->depth, 1);
}

TEST_F(BackendTest, PastTheEndOfAShorterMiddleLayerThatLayerAnswersWithZeros) {
    // top (1 MiB) -> middle (64 KiB) -> base (1 MiB of data): past 64 KiB the image reads
    // zeros, and it is the middle layer's end that makes them so, not the absence of data.
    auto base = std::make_shared<test::MemNode>(env(), "base", 1 << 20);
    auto middle = std::make_shared<EmptyLayer>(env(), 64 << 10);
    auto top = std::make_shared<EmptyLayer>(env(), 1 << 20);
    Transaction tx(&graph_);
    tx.attach(top.get(), middle, ChildRole::kBacking, "backing");
    tx.attach(middle.get(), base, ChildRole::kBacking, "backing");
    ASSERT_TRUE(tx.commit().ok());
    Result<ChainStatus> below = run(block_status_above(top.get(), 0, 1 << 20));
    ASSERT_TRUE(below.ok()) << below.error().message();
    EXPECT_TRUE(below->data);
    EXPECT_EQ(below->bytes, 64U << 10);
    EXPECT_EQ(below->depth, 2);
    Result<ChainStatus> past = run(block_status_above(top.get(), 64 << 10, (1 << 20) - (64 << 10)));
    ASSERT_TRUE(past.ok()) << past.error().message();
    EXPECT_FALSE(past->data);
    EXPECT_EQ(past->bytes, (1U << 20) - (64U << 10));
    EXPECT_EQ(past->depth, 1);
}

TEST_F(BackendTest, BlockStatusWaitsWhileTheChainIsDrained) {
    auto mem = std::make_shared<test::MemNode>(env(), "mem", 1 << 20);
    BlockBackend be(loop_.get(), "vm");
    {
        Transaction tx(&graph_);
        be.attach(&tx, mem, perm::kConsistentRead, perm::kAll);
        ASSERT_TRUE(tx.commit().ok());
    }
    std::vector<std::shared_ptr<Node>> nodes{mem};
    DrainGuard drained = run(drain(nodes));
    Result<ChainStatus> st = Error{};
    bool done = false;
    TaskScope scope(loop_.get());
    scope.spawn(status_of(&be, &st, &done));
    for (int i = 0; i < 5; ++i) {
        run(tick());
    }
    EXPECT_FALSE(done) << "block status ran inside a drained section";
    drained.end();
    run(join(&scope));
    EXPECT_TRUE(done);
    EXPECT_TRUE(st.ok());
}

TEST_F(BackendTest, AWriteThatClaimedTheChainWaitsForADrainThatBeganMeanwhile) {
    auto layer = std::make_shared<ClaimedLayer>(env(), 1 << 20);
    BlockBackend* be = use_rw(layer);
    std::vector<uint8_t> buf(4096);
    Status written = Error{};
    bool done = false;
    TaskScope scope(loop_.get());
    scope.spawn(write_and_note(be, buf, &written, &done));
    while (layer->claims_started == 0) {
        run(tick());
    }
    // The claim suspends before the write is in flight, so a job's drain completes now.
    std::vector<std::shared_ptr<Node>> nodes{layer};
    DrainGuard drained = run(drain(nodes));
    layer->let_claim_finish = true;
    while (layer->claims_finished == 0) {
        run(tick());
    }
    for (int i = 0; i < 3; ++i) {  // the write's coroutine, had it gone on, would have by now
        run(tick());
    }
    EXPECT_EQ(layer->writes, 0) << "the write ran inside a drained section";
    EXPECT_FALSE(done);
    drained.end();
    run(join(&scope));
    EXPECT_TRUE(done);
    EXPECT_TRUE(written.ok());
    EXPECT_EQ(layer->writes, 1);
    EXPECT_EQ(layer->claims_started, 1);
}

TEST_F(BackendTest, FencedBackendRefusesEveryRequest) {
    auto mem = std::make_shared<test::MemNode>(env(), "mem", 1 << 20);
    BlockBackend* be = use_rw(mem);
    std::vector<uint8_t> buf(4096);
    ASSERT_TRUE(run(be->write(0, buf)).ok());
    be->fence("the commit filter could not be taken out");
    EXPECT_TRUE(be->fenced());
    Status r = run(be->read(0, buf));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().errnum, EIO);
    EXPECT_NE(r.error().message().find("could not be taken out"), std::string::npos);
    EXPECT_EQ(run(be->write(0, buf)).error().errnum, EIO);
    EXPECT_EQ(run(be->flush()).error().errnum, EIO);
    EXPECT_EQ(run(be->block_status_above(0, 4096)).error().errnum, EIO);
}

// What a reader may cache (fuse/read_ahead.h) is tied to the content generation: every
// request that changes content (write, write-zeroes, discard; truncate is the same guard)
// moves it when admitted and when done, and so does every drained
// section; reads and flushes do not.
TEST_F(BackendTest, ContentGenerationMovesWithEveryChangeOfContent) {
    auto mem = std::make_shared<test::MemNode>(env(), "mem", 1 << 20);
    BlockBackend* be = use_rw(mem);
    AlignedBuffer buf = AlignedBuffer::zeroed(4096);
    uint64_t g = be->content_generation();
    ASSERT_TRUE(run(be->read(0, buf.span())).ok());
    ASSERT_TRUE(run(be->read_ahead(4096, buf.span())).ok());
    ASSERT_TRUE(run(be->flush()).ok());
    EXPECT_EQ(be->content_generation(), g);
    ASSERT_TRUE(run(be->write(0, buf.span())).ok());
    EXPECT_EQ(be->content_generation(), g + 2);
    ASSERT_TRUE(run(be->write_zeroes(0, 4096, false)).ok());
    ASSERT_TRUE(run(be->discard(0, 4096)).ok());
    EXPECT_EQ(be->content_generation(), g + 6);
    {
        std::vector<std::shared_ptr<Node>> nodes{mem};
        DrainGuard drained = run(drain(nodes));
        EXPECT_EQ(be->content_generation(), g + 7);
    }
    EXPECT_EQ(be->content_generation(), g + 8);
    // While a write is in flight the count says so (a read ahead is then not started).
    mem->hold();
    Status st = Error{};
    bool done = false;
    TaskScope scope(loop_.get());
    scope.spawn(write_and_note(be, buf.span(), &st, &done));
    run(tick());
    EXPECT_EQ(be->writes_in_flight(), 1U);
    EXPECT_EQ(be->content_generation(), g + 9);
    mem->release();
    run(join(&scope));
    EXPECT_TRUE(st.ok());
    EXPECT_EQ(be->writes_in_flight(), 0U);
    EXPECT_EQ(be->content_generation(), g + 10);
}

}  // namespace
}  // namespace imgfs
