// RbdNode against a throwaway Ceph cluster: data round trips with many requests in flight, an
// image that grows under concurrent writes past its end, zeroing and discard, the read-only
// mode, and a cluster that stops answering. The `rbd` tool is the oracle for what is stored.
#include "drivers/rbd/rbd_node.h"

#include <chrono>
#include <cstring>
#include <fstream>

#include "ceph_util.h"
#include "core/task_scope.h"

namespace imgfs::test {
namespace {

class RbdNodeTest : public CephLoopTest {
  protected:
    void SetUp() override {
        CephLoopTest::SetUp();
        if (ceph_unusable()) {
            return;
        }
        connect(10);
    }
    /// (Re)connects with a deadline of `timeout_s`.
    void connect(uint32_t timeout_s) {
        pool_.reset();
        auto c = RadosCluster::connect(rados_options(*cluster_, timeout_s));
        ASSERT_TRUE(c.ok()) << c.error().message();
        auto p = RbdPool::open(std::move(*c), "rbd", "", loop_.get());
        ASSERT_TRUE(p.ok()) << p.error().message();
        pool_ = std::move(*p);
    }
    void TearDown() override {
        LoopTest::TearDown();
        nodes_.clear();
        pool_.reset();
    }

    void create_image(const std::string& name, uint64_t bytes) {
        int st = 0;
        cluster_->rbd("create --size " + std::to_string(bytes >> 20) + "M rbd/" + name, &st);
        ASSERT_EQ(st, 0);
    }
    std::shared_ptr<RbdNode> open_node(const std::string& name, bool read_only) {
        auto image = RbdImage::open(pool_, name, read_only);
        EXPECT_TRUE(image.ok()) << image.error().message();
        if (!image) {
            return nullptr;
        }
        auto size = image->size();
        EXPECT_TRUE(size.ok()) << size.error().message();
        auto node =
            RbdNode::open(env(), name, std::move(*image), RbdLock::kNone, size.ok() ? *size : 0);
        EXPECT_TRUE(node.ok()) << node.error().message();
        if (!node) {
            return nullptr;
        }
        nodes_.push_back(*node);
        return *node;
    }
    /// A fresh 8 MiB image `name` on a cluster with a 3 s deadline, opened for writing, with
    /// `buf` written and flushed (which also makes librbd take the image's lock).
    std::shared_ptr<RbdNode> written_node_with_short_deadline(const std::string& name,
                                                              const std::vector<uint8_t>& buf) {
        connect(3);
        create_image(name, 8 << 20);
        auto node = open_node(name, false);
        if (node == nullptr) {
            return nullptr;
        }
        use_rw(node);
        EXPECT_TRUE(run(node->write(0, ConstBuf(buf.data(), buf.size()))).ok());
        EXPECT_TRUE(run(node->flush()).ok());
        return node;
    }
    /// The image's bytes as `rbd export` writes them.
    std::vector<uint8_t> exported(const std::string& name) {
        const std::string out = cluster_->dir() + "/" + name + ".export";
        int st = 0;
        cluster_->rbd("export --no-progress rbd/" + name + " " + out, &st);
        EXPECT_EQ(st, 0);
        std::ifstream in(out, std::ios::binary);
        std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                   std::istreambuf_iterator<char>());
        std::remove(out.c_str());
        return bytes;
    }

    std::shared_ptr<RbdPool> pool_;
    std::vector<std::shared_ptr<Node>> nodes_;
};

Task<void> join_scope(TaskScope* scope) {
    co_await scope->join();
}

Task<void> run_into(Task<Status> task, Status* out) {
    *out = co_await std::move(task);
}

// Writes `count` 4 KiB blocks at once, each at block i*stride, then reads them back at once.
Task<Status> write_then_read(Node* node, const std::vector<uint8_t>* data, uint64_t stride,
                             std::vector<uint8_t>* back) {
    const uint64_t count = data->size() / 4096;
    std::vector<Status> results(count);
    {
        TaskScope scope(node->env().loop);
        for (uint64_t i = 0; i < count; ++i) {
            scope.spawn(run_into(node->write(i * stride, ConstBuf(data->data() + i * 4096, 4096)),
                                 &results[i]));
        }
        co_await scope.join();
    }
    for (Status& st : results) {
        CO_TRY(std::move(st));
    }
    back->assign(data->size(), 0);
    {
        TaskScope scope(node->env().loop);
        for (uint64_t i = 0; i < count; ++i) {
            scope.spawn(run_into(node->read(i * stride, MutBuf(back->data() + i * 4096, 4096)),
                                 &results[i]));
        }
        co_await scope.join();
    }
    for (Status& st : results) {
        CO_TRY(std::move(st));
    }
    co_return co_await node->flush();
}

TEST_F(RbdNodeTest, ManyRequestsInFlightRoundTrip) {
    create_image("round", 64 << 20);
    auto node = open_node("round", false);
    ASSERT_NE(node, nullptr);
    use_rw(node);
    std::mt19937_64 rng(1);
    std::vector<uint8_t> data = random_bytes(&rng, 128 * 4096);  // 128 requests at once
    std::vector<uint8_t> back;
    const uint64_t stride = 256 * 1024;  // spread over several 4 MiB objects
    Status st = run(write_then_read(node.get(), &data, stride, &back));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(back, data);
    std::vector<uint8_t> image = exported("round");
    ASSERT_EQ(image.size(), 64u << 20);
    for (uint64_t i = 0; i < 128; ++i) {
        ASSERT_EQ(std::memcmp(image.data() + i * stride, data.data() + i * 4096, 4096), 0) << i;
    }
}

TEST_F(RbdNodeTest, WritesPastTheEndGrowTheImage) {
    create_image("grow", 1 << 20);
    auto node = open_node("grow", false);
    ASSERT_NE(node, nullptr);
    use_rw(node);
    std::mt19937_64 rng(2);
    std::vector<uint8_t> data = random_bytes(&rng, 64 * 4096);
    std::vector<uint8_t> back;
    // 64 concurrent writes, most past the end, each further out: the resizes serialise.
    Status st = run(write_then_read(node.get(), &data, 65536, &back));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(back, data);
    EXPECT_EQ(node->size(), 63 * 65536 + 4096);
    // The image grew ahead of the writes, once, and closing gives the room back.
    EXPECT_NE(cluster_->rbd("info rbd/grow").find("size 5 MiB"), std::string::npos);
    ASSERT_TRUE(run(node->close()).ok());
    std::vector<uint8_t> image = exported("grow");
    ASSERT_EQ(image.size(), 63 * 65536 + 4096);
    EXPECT_EQ(std::memcmp(image.data() + 63 * 65536, data.data() + 63 * 4096, 4096), 0);
}

TEST_F(RbdNodeTest, ZeroesAndDiscardReadBackAsZeros) {
    create_image("zero", 16 << 20);
    auto node = open_node("zero", false);
    ASSERT_NE(node, nullptr);
    use_rw(node);
    std::vector<uint8_t> ones(8 << 20, 0xa5);
    ASSERT_TRUE(run(node->write(0, ConstBuf(ones.data(), ones.size()))).ok());
    Status st = run(node->write_zeroes(4096, 1 << 20, false));
    ASSERT_TRUE(st.ok()) << st.error().message();
    st = run(node->discard(4 << 20, 4 << 20));  // one whole object
    ASSERT_TRUE(st.ok()) << st.error().message();
    ASSERT_TRUE(run(node->flush()).ok());
    std::vector<uint8_t> image = exported("zero");
    ASSERT_EQ(image.size(), 16u << 20);
    EXPECT_EQ(image[0], 0xa5);
    EXPECT_EQ(image[4095], 0xa5);
    for (uint64_t i = 4096; i < 4096 + (1 << 20); i += 512) {
        ASSERT_EQ(image[i], 0) << i;
    }
    EXPECT_EQ(image[4096 + (1 << 20)], 0xa5);
    // Discard is advisory, but librbd drops whole objects, which then read as zeros.
    EXPECT_EQ(image[(4 << 20) + 100], 0);
    // And the resize through truncate is seen by the cluster.
    ASSERT_TRUE(run(node->truncate(2 << 20)).ok());
    EXPECT_NE(cluster_->rbd("info rbd/zero").find("size 2 MiB"), std::string::npos);
}

TEST_F(RbdNodeTest, BlockStatusFollowsWhatWasWritten) {
    create_image("map", 16 << 20);
    auto node = open_node("map", false);
    ASSERT_NE(node, nullptr);
    use_rw(node);
    EXPECT_TRUE(node->caps().block_status);
    std::vector<uint8_t> ones(65536, 1);
    ASSERT_TRUE(run(node->write(1 << 20, ConstBuf(ones.data(), 4096))).ok());
    ASSERT_TRUE(run(node->write(9 << 20, ConstBuf(ones.data(), ones.size()))).ok());
    ASSERT_TRUE(run(node->flush()).ok());
    // RBD knows allocation per object (4 MiB here), from the object's start to its last
    // written byte: the runs cover what was written and leave never-written objects as zeros.
    const uint64_t size = 16 << 20;
    std::vector<std::pair<uint64_t, uint64_t>> data;
    for (uint64_t off = 0; off < size;) {
        auto st = run(node->block_status(off, size - off));
        ASSERT_TRUE(st.ok()) << st.error().message();
        ASSERT_GT(st->bytes, 0u);
        if (st->alloc == Alloc::kData) {
            data.emplace_back(off, off + st->bytes);
        } else {
            EXPECT_EQ(st->alloc, Alloc::kZero);
        }
        off += st->bytes;
    }
    auto covered = [&data](uint64_t start, uint64_t end) {
        for (const auto& [s, e] : data) {
            if (s <= start && end <= e) {
                return true;
            }
        }
        return false;
    };
    EXPECT_TRUE(covered(1 << 20, (1 << 20) + 4096));
    EXPECT_TRUE(covered(9 << 20, (9 << 20) + 65536));
    for (const auto& [s, e] : data) {
        EXPECT_TRUE(e <= (4 << 20) || (s >= (8 << 20) && e <= (12 << 20)))
            << "data reported in a never-written object: " << s << ".." << e;
    }
    // A query is bounded; asked less, it says less.
    auto part = run(node->block_status(0, 4096));
    ASSERT_TRUE(part.ok());
    EXPECT_EQ(part->bytes, 4096u);
}

TEST_F(RbdNodeTest, ReadOnlyImageRefusesWriters) {
    create_image("ro", 4 << 20);
    auto node = open_node("ro", true);
    ASSERT_NE(node, nullptr);
    EXPECT_TRUE(node->read_only());
    Status st = node->check_perm(perm::kWrite, perm::kAll);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EROFS);
    std::vector<uint8_t> buf(4096, 1);
    ASSERT_TRUE(run(node->read(0, MutBuf(buf.data(), buf.size()))).ok());
    EXPECT_EQ(buf, std::vector<uint8_t>(4096, 0));
}

// A claim that took the lock and then failed (its size query timed out) leaves the lock with
// this handle; the next claim must find it its own, not a live writer to refuse.
TEST_F(RbdNodeTest, ALockThisHandleHoldsIsItsOwnOnTheNextClaim) {
    create_image("relock", 4 << 20);
    auto image = RbdImage::open(pool_, "relock", false);
    ASSERT_TRUE(image.ok()) << image.error().message();
    ASSERT_TRUE(image->lock_exclusive().ok());
    Status again = image->lock_exclusive();
    EXPECT_TRUE(again.ok()) << again.error().message();
}

TEST_F(RbdNodeTest, ClusterThatStopsAnsweringGivesEioWithinTheDeadline) {
    std::vector<uint8_t> buf(65536, 7);
    auto node = written_node_with_short_deadline("dead", buf);
    ASSERT_NE(node, nullptr);
    cluster_->pause_osd();
    auto t0 = std::chrono::steady_clock::now();
    Status st = run(node->write(1 << 20, ConstBuf(buf.data(), buf.size())));
    if (st) {
        st = run(node->flush());  // a write-back cache may take the write; the flush cannot
    }
    double waited_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cluster_->resume_osd();
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EIO);
    EXPECT_NE(st.error().message().find("did not answer within 3 s"), std::string::npos)
        << st.error().message();
    EXPECT_LT(waited_s, 3 * 3 + 2);  // a write and a flush, each with its deadline
    // With the OSD back, the image serves again.
    Status again = run(node->read(0, MutBuf(buf.data(), buf.size())));
    EXPECT_TRUE(again.ok()) << again.error().message();
    EXPECT_EQ(buf[0], 7);
}

TEST_F(RbdNodeTest, WhileClosingOnlyTheFirstCallWaitsForAClusterThatStoppedAnswering) {
    std::vector<uint8_t> buf(65536, 5);
    auto first = written_node_with_short_deadline("closing1", buf);
    ASSERT_NE(first, nullptr);
    create_image("closing2", 8 << 20);
    auto second = open_node("closing2", false);
    ASSERT_NE(second, nullptr);
    use_rw(second);
    ASSERT_TRUE(run(second->write(0, ConstBuf(buf.data(), buf.size()))).ok());
    // A deadline missed before the close (the cluster has recovered since) does not count.
    pool_->cluster().note_unanswered();
    pool_->cluster_ref()->begin_closing();
    EXPECT_FALSE(pool_->cluster().skip_round_trips());
    cluster_->pause_osd();
    auto seconds_since = [](std::chrono::steady_clock::time_point t0) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    auto t0 = std::chrono::steady_clock::now();
    Status waited = run(first->write(1 << 20, ConstBuf(buf.data(), buf.size())));
    const double waited_s = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    Status skipped = run(second->write(1 << 20, ConstBuf(buf.data(), buf.size())));
    Status closed = run(first->close());  // its flush is skipped; its close is not waited for
    const double skipped_s = seconds_since(t0);
    EXPECT_TRUE(pool_->cluster().skip_round_trips());
    cluster_->resume_osd();
    ASSERT_FALSE(waited.ok());
    EXPECT_NE(waited.error().message().find("did not answer within 3 s"), std::string::npos)
        << waited.error().message();
    EXPECT_GT(waited_s, 2.5);
    ASSERT_FALSE(skipped.ok());
    EXPECT_EQ(skipped.error().errnum, EIO);
    EXPECT_NE(skipped.error().message().find("skipped: the Ceph cluster did not answer within 3 s"),
              std::string::npos)
        << skipped.error().message();
    EXPECT_FALSE(closed.ok());
    EXPECT_LT(skipped_s, 2.0);  // not a 3 s deadline; room for a loaded sanitizer run
}

Task<void> write_past_end(Node* node, uint64_t offset, const std::vector<uint8_t>* buf,
                          Status* out) {
    *out = co_await node->write(offset, ConstBuf(buf->data(), buf->size()));
}

TEST_F(RbdNodeTest, WritesWaitingBehindAFailedGrowFailWithItAtOnce) {
    std::vector<uint8_t> buf(65536, 9);
    // (The write there makes librbd take its lock; without it the grow would fail for want
    // of the lock, not of the cluster.)
    auto node = written_node_with_short_deadline("stuck", buf);
    ASSERT_NE(node, nullptr);
    constexpr int kWriters = 6;
    std::vector<Status> results(kWriters);
    cluster_->pause_osd();
    auto t0 = std::chrono::steady_clock::now();
    {
        TaskScope scope(loop_.get());
        for (int i = 0; i < kWriters; ++i) {
            // Each past the end and past what one grow-ahead covers: each needs a grow.
            scope.spawn(write_past_end(node.get(), (64ULL << 20) * (i + 1), &buf, &results[i]));
        }
        run(join_scope(&scope));
    }
    double waited_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cluster_->resume_osd();
    for (const Status& st : results) {
        ASSERT_FALSE(st.ok());
        EXPECT_EQ(st.error().errnum, EIO) << st.error().message();
    }
    // The one grow they all waited behind (two round trips inside librbd, each with its
    // deadline: 6 s measured), not one grow per writer (36 s).
    EXPECT_LT(waited_s, 3 * 3 + 2);
}

}  // namespace
}  // namespace imgfs::test
