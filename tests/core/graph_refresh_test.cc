// The permission refresh checks what a transaction touches, so images are independent: a node of
// another image in the middle of its own change (a layer frozen just before its switch) does not
// make this transaction fail, while every node whose users change is checked.
#include <gtest/gtest.h>

#include "core/backend.h"
#include "core/graph.h"
#include "core/transaction.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

using test::MemNode;

constexpr Perms kRw = perm::kConsistentRead | perm::kWrite | perm::kResize;
constexpr Perms kShareRead = perm::kConsistentRead | perm::kWriteUnchanged;

class GraphRefreshTest : public test::LoopTest {
  protected:
    Status attach(BlockBackend* be, std::shared_ptr<Node> node, Perms perm) {
        Transaction tx(&graph_);
        be->attach(&tx, std::move(node), perm, kShareRead);
        return tx.commit();
    }
};

TEST_F(GraphRefreshTest, AnotherImagesTransientStateDoesNotFailThisTransaction) {
    auto a = std::make_shared<MemNode>(env(), "a", 1 << 20);
    auto b = std::make_shared<MemNode>(env(), "b", 1 << 20);
    BlockBackend be_a(loop_.get(), "a");
    BlockBackend be_b(loop_.get(), "b");
    ASSERT_TRUE(attach(&be_b, b, kRw).ok());
    // b is frozen for a snapshot whose switch has not happened yet: read-only, still written.
    b->set_read_only(true);
    Status st = attach(&be_a, a, kRw);
    EXPECT_TRUE(st.ok()) << st.error().message();
    // A change that touches b itself is checked and refused.
    BlockBackend reader(loop_.get(), "reader");
    Transaction tx(&graph_);
    reader.attach(&tx, b, perm::kConsistentRead, perm::kAll);
    Status touched = tx.commit();
    ASSERT_FALSE(touched.ok());
    EXPECT_NE(touched.error().message().find("b is read-only"), std::string::npos)
        << touched.error().message();
}

TEST_F(GraphRefreshTest, NodeWhoseUsersChangeIsCheckedEvenWithEqualPermissions) {
    // backend -> filter-like old node; the backend's edge moves to a read-only node. The edge's
    // permissions are unchanged, but the node it now points at must grant them.
    auto old_node = std::make_shared<MemNode>(env(), "old", 1 << 20);
    auto ro = std::make_shared<MemNode>(env(), "ro", 1 << 20);
    ro->set_read_only(true);
    BlockBackend be(loop_.get(), "vm");
    ASSERT_TRUE(attach(&be, old_node, kRw).ok());
    Transaction tx(&graph_);
    tx.replace_node(old_node.get(), ro);
    Status st = tx.commit();
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EROFS);
    EXPECT_EQ(be.root_node(), old_node.get());  // undone
}

TEST_F(GraphRefreshTest, RemovalStandsWhenTheRefreshIsRefused) {
    auto a = std::make_shared<MemNode>(env(), "a", 1 << 20);
    BlockBackend w(loop_.get(), "w");
    BlockBackend r(loop_.get(), "r");
    ASSERT_TRUE(attach(&w, a, kRw).ok());
    {
        Transaction tx(&graph_);
        r.attach(&tx, a, perm::kConsistentRead, perm::kAll);
        ASSERT_TRUE(tx.commit().ok());
    }
    a->set_read_only(true);  // now the writer's permission cannot be granted again
    Transaction tx(&graph_);
    tx.detach(r.root());
    Status st = tx.commit_removal();
    EXPECT_FALSE(st.ok());         // the refresh was refused (a is touched)...
    EXPECT_EQ(r.root(), nullptr);  // ...but the reader is gone all the same
    EXPECT_EQ(a->parents().size(), 1U);
}

}  // namespace
}  // namespace imgfs
