// Graph edits with fake drivers: permissions, conflicts, transaction rollback, drained sections.
#include "core/graph.h"

#include <gtest/gtest.h>

#include "core/backend.h"
#include "core/drain.h"
#include "core/task_scope.h"
#include "core/transaction.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

using test::MemNode;

constexpr Perms kRw = perm::kConsistentRead | perm::kWrite | perm::kResize;
constexpr Perms kShareRead = perm::kConsistentRead | perm::kWriteUnchanged;

class GraphTest : public test::LoopTest {
  protected:
    std::shared_ptr<MemNode> mem(const std::string& name, uint64_t size = 1 << 20) {
        return std::make_shared<MemNode>(env(), name, size);
    }
    Status attach_backend(BlockBackend* be, std::shared_ptr<Node> node, Perms perm) {
        Transaction tx(&graph_);
        be->attach(&tx, std::move(node), perm, kShareRead);
        return tx.commit();
    }
};

//   backend a (write) ---> disk <--- backend b (write)
// The second writer must be refused and leave the graph as it was.
TEST_F(GraphTest, TwoWritersOnOneNodeConflict) {
    auto disk = mem("disk");
    BlockBackend a(loop_.get(), "a");
    BlockBackend b(loop_.get(), "b");
    ASSERT_TRUE(attach_backend(&a, disk, kRw).ok());
    std::string before = graph_.dump();

    Status st = attach_backend(&b, disk, kRw);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EBUSY);
    EXPECT_NE(st.error().context.find("disk"), std::string::npos) << st.error().context;
    EXPECT_NE(st.error().context.find("write"), std::string::npos) << st.error().context;
    EXPECT_EQ(b.root(), nullptr);
    EXPECT_EQ(disk->parents().size(), 1U);
    EXPECT_EQ(graph_.dump(), before);

    // A reader that itself forbids writes conflicts with the writer too...
    EXPECT_FALSE(attach_backend(&b, disk, perm::kConsistentRead).ok());
    // ...but one that tolerates writers is fine.
    Transaction tx(&graph_);
    b.attach(&tx, disk, perm::kConsistentRead, perm::kAll);
    EXPECT_TRUE(tx.commit().ok());
}

//   backend vm2 ---> top2 --backing--> base <--- backend x (write)
// base is the backing of another chain, whose edge does not share write: refused.
TEST_F(GraphTest, WriterOnSomeoneElsesBackingConflicts) {
    auto base = mem("base");
    auto top2 = mem("top2");
    BlockBackend vm2(loop_.get(), "vm2");
    {
        Transaction tx(&graph_);
        tx.attach(top2.get(), base, ChildRole::kBacking, "backing");
        vm2.attach(&tx, top2, kRw, kShareRead);
        ASSERT_TRUE(tx.commit().ok());
    }
    EXPECT_EQ(top2->backing()->perm(), perm::kConsistentRead);
    std::string before = graph_.dump();

    BlockBackend x(loop_.get(), "x");
    Status st = attach_backend(&x, base, kRw);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EBUSY);
    EXPECT_NE(st.error().context.find("backing"), std::string::npos) << st.error().context;
    EXPECT_EQ(graph_.dump(), before);

    // Reading the shared base is allowed.
    BlockBackend r(loop_.get(), "r");
    EXPECT_TRUE(attach_backend(&r, base, perm::kConsistentRead).ok());
}

// A job may be allowed to write into the backing of the chain it merges (extra shared perms on
// that one edge), but not while another chain also uses the base.
//
//   vm1 -> top1 --backing--> base <--backing-- top2 <- vm2
//                              ^--- commit job (write)
TEST_F(GraphTest, ExtraSharedOnlyRelaxesOneEdge) {
    auto base = mem("base");
    auto top1 = mem("top1");
    BlockBackend vm1(loop_.get(), "vm1");
    {
        Transaction tx(&graph_);
        tx.attach(top1.get(), base, ChildRole::kBacking, "backing");
        vm1.attach(&tx, top1, kRw, kShareRead);
        ASSERT_TRUE(tx.commit().ok());
    }
    BlockBackend job(loop_.get(), "commit-job");
    {
        Transaction tx(&graph_);
        tx.set_extra_shared(top1->backing(), perm::kWrite);
        job.attach(&tx, base, perm::kConsistentRead | perm::kWrite, perm::kAll);
        ASSERT_TRUE(tx.commit().ok());
    }
    // A second chain on the same base forbids the job's write.
    auto top2 = mem("top2");
    Transaction tx(&graph_);
    tx.attach(top2.get(), base, ChildRole::kBacking, "backing");
    Status st = tx.commit();
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(base->parents().size(), 2U);
}

// Rollback leaves the graph exactly as it was, edge order included.
//
// before:  be -> a --backing--> b        attempted: be -> c --backing--> a --backing--> b
//                                                    plus a conflicting writer on b
TEST_F(GraphTest, FailedTransactionRestoresEverything) {
    auto a = mem("a");
    auto b = mem("b");
    auto c = mem("c");
    BlockBackend be(loop_.get(), "be");
    {
        Transaction tx(&graph_);
        tx.attach(a.get(), b, ChildRole::kBacking, "backing");
        be.attach(&tx, a, kRw, kShareRead);
        ASSERT_TRUE(tx.commit().ok());
    }
    std::string before = graph_.dump();
    BlockBackend w(loop_.get(), "w");
    {
        Transaction tx(&graph_);
        tx.append_overlay(a, c);
        w.attach(&tx, b, kRw, kShareRead);  // conflicts with a's backing edge
        EXPECT_EQ(be.root_node(), c.get());
        ASSERT_FALSE(tx.commit().ok());
    }
    EXPECT_EQ(graph_.dump(), before);
    EXPECT_EQ(be.root_node(), a.get());
    EXPECT_EQ(c->backing(), nullptr);
    EXPECT_EQ(w.root(), nullptr);
    EXPECT_EQ(a->parents().size(), 1U);
}

TEST_F(GraphTest, DetachAbortPutsEdgeBack) {
    auto a = mem("a");
    auto b = mem("b");
    BlockBackend be(loop_.get(), "be");
    {
        Transaction tx(&graph_);
        tx.attach(a.get(), b, ChildRole::kBacking, "backing");
        be.attach(&tx, a, kRw, kShareRead);
        ASSERT_TRUE(tx.commit().ok());
    }
    std::string before = graph_.dump();
    {
        Transaction tx(&graph_);
        tx.detach(a->backing());
        EXPECT_EQ(a->backing(), nullptr);
        // destroyed without commit: aborts
    }
    EXPECT_EQ(graph_.dump(), before);
    ASSERT_NE(a->backing(), nullptr);
    EXPECT_EQ(a->backing()->node(), b.get());
}

Task<void> backend_io(BlockBackend* be, int i, int* ok) {
    std::vector<uint8_t> buf(4096, static_cast<uint8_t>(i));
    Status st = i % 2 == 0 ? co_await be->write(static_cast<uint64_t>(i) * 4096, buf)
                           : co_await be->read(static_cast<uint64_t>(i) * 4096, buf);
    if (st.ok()) {
        ++*ok;
    }
}

// Takes a snapshot while requests are in flight:
//
//   before:  be -> base           after:  be -> overlay --backing--> base
Task<Status> snapshot(Graph* graph, std::shared_ptr<MemNode> base, std::shared_ptr<MemNode> overlay,
                      bool* drained_with_nothing_in_flight) {
    std::vector<std::shared_ptr<Node>> nodes;
    nodes.push_back(base);
    DrainGuard drained = co_await drain(std::move(nodes));
    *drained_with_nothing_in_flight = base->in_flight() == 0 && base->active == 0;
    Transaction tx(graph);
    tx.append_overlay(base, overlay);
    co_return tx.commit();
}

Task<void> join(TaskScope* s) {
    co_await s->join();
}

TEST_F(GraphTest, AppendOverlayWith64RequestsInFlight) {
    auto base = mem("base", 1 << 20);
    auto overlay = mem("overlay", 1 << 20);
    BlockBackend be(loop_.get(), "be");
    ASSERT_TRUE(attach_backend(&be, base, kRw).ok());

    TaskScope scope(loop_.get());
    int ok = 0;
    base->hold();
    for (int i = 0; i < 64; ++i) {
        scope.spawn(backend_io(&be, i, &ok));
    }
    EXPECT_EQ(base->active, 64);

    bool clean_drain = false;
    Status snap_status = Error{EINPROGRESS, ""};
    auto snap = [](Graph* g, std::shared_ptr<MemNode> b, std::shared_ptr<MemNode> o, bool* c,
                   Status* out) -> Task<void> { *out = co_await snapshot(g, b, o, c); };
    scope.spawn(snap(&graph_, base, overlay, &clean_drain, &snap_status));
    // New requests arrive while the drain waits: they must go to the overlay afterwards.
    for (int i = 64; i < 80; ++i) {
        scope.spawn(backend_io(&be, i, &ok));
    }
    EXPECT_EQ(base->active, 64);  // the newcomers wait at the backend
    base->release();
    run(join(&scope));

    EXPECT_TRUE(snap_status.ok()) << snap_status.error().message();
    EXPECT_TRUE(clean_drain);
    EXPECT_EQ(ok, 80);
    EXPECT_EQ(be.root_node(), overlay.get());
    EXPECT_EQ(overlay->backing()->node(), base.get());
    // The 8 even-numbered late writes went to the overlay, none to the base.
    EXPECT_EQ(overlay->data[64 * 4096], 64);
    EXPECT_EQ(base->data[64 * 4096], 0);
    EXPECT_EQ(base->data[2 * 4096], 2);
    EXPECT_FALSE(be.quiesced());
    EXPECT_FALSE(base->quiesced());
    EXPECT_FALSE(overlay->quiesced());
}

// replace_node: the commit pivot (overlay merged into base; the backend goes back to base).
//
//   before:  be -> top --backing--> base      after: be -> base
TEST_F(GraphTest, ReplaceNodePivotsUsers) {
    auto base = mem("base");
    auto top = mem("top");
    BlockBackend be(loop_.get(), "be");
    {
        Transaction tx(&graph_);
        tx.attach(top.get(), base, ChildRole::kBacking, "backing");
        be.attach(&tx, top, kRw, kShareRead);
        ASSERT_TRUE(tx.commit().ok());
    }
    EXPECT_EQ(base->cumulative_perm(), perm::kConsistentRead);
    {
        Transaction tx(&graph_);
        tx.replace_node(top.get(), base);
        tx.detach(top->backing());
        ASSERT_TRUE(tx.commit().ok());
    }
    EXPECT_EQ(be.root_node(), base.get());
    EXPECT_TRUE(top->parents().empty());
    EXPECT_EQ(base->parents().size(), 1U);
    EXPECT_EQ(base->cumulative_perm(), kRw);
}

TEST_F(GraphTest, ReadOnlyNodeRefusesWriters) {
    auto disk = mem("disk");
    disk->set_read_only(true);
    BlockBackend be(loop_.get(), "be");
    Status st = attach_backend(&be, disk, kRw);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EROFS);
    EXPECT_TRUE(attach_backend(&be, disk, perm::kConsistentRead).ok());
}

}  // namespace
}  // namespace imgfs
