// The metadata write order's first rule, checked on what reaches the storage: an L2 entry that
// points at data a write just put there reaches the storage only after that data is durable (a
// flush issued after the data write completed has completed). The crash harness checks the
// same through crash states, but its random 512-byte writes nearly always copy on write; these
// are the aligned whole-cluster writes that do not.
#include <unistd.h>

#include <gtest/gtest.h>

#include "core/graph.h"
#include "core/transaction.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "image_test_util.h"
#include "recorder_util.h"

namespace imgfs {
namespace {

using test::Clock;
using test::Journal;
using test::RecordedOp;

constexpr uint64_t kCluster = 65536;

class WriteOrderTest : public test::LoopTest {
  protected:
    // Opens a fresh image (qemu-img create with `options`) over recorded in-memory storage.
    void open_image(const std::string& options) {
        const std::string path = dir_.file("img.qcow2");
        test::must(fmt::format("qemu-img create -q -f qcow2 -o cluster_size=65536{} '{}' 16M",
                               options, path));
        open_file(path);
    }
    // Opens the image at `path` over recorded in-memory storage.
    void open_file(const std::string& path) {
        storage_ = std::make_shared<test::VecNode>(env(), "mem", test::read_file(path));
        journal_.initial = storage_->data;
        Transaction tx(&graph_);
        auto rec = test::RecorderNode::attach(env(), "recorder", &tx, storage_, &clock_, &journal_);
        node_ = Qcow2Node::create(env(), "img", &tx, rec, qcow2::Options{});
        ASSERT_TRUE(tx.commit().ok());
        ASSERT_TRUE(run(node_->load()).ok());
        use_rw(node_);
    }

    void write_cluster(uint64_t offset, uint8_t fill) {
        std::vector<uint8_t> data(kCluster, fill);
        Status st = run(node_->write(offset, data));
        ASSERT_TRUE(st.ok()) << st.error().message();
    }
    void flush() {
        Status st = run(node_->flush());
        ASSERT_TRUE(st.ok()) << st.error().message();
    }

    // Where guest cluster 0's L2 table lies, from the storage's current bytes.
    [[nodiscard]] uint64_t l2_table_offset() const {
        const uint8_t* image = storage_->data.data();
        const uint64_t l1 = qcow2::load_be64(image + qcow2::kOffL1TableOffset);
        return qcow2::load_be64(image + l1) & 0x00fffffffffffe00ULL;
    }

    // Every data write of whole clusters filled with `fill` is durable before any later write
    // to the L2 table reaches the storage.
    void expect_data_durable_before_l2(uint8_t fill) {
        const uint64_t l2 = l2_table_offset();
        ASSERT_NE(l2, 0U);
        int data_writes = 0;
        for (const RecordedOp& data : journal_.ops) {
            if (data.kind != RecordedOp::kWrite || data.bytes != kCluster ||
                data.data != std::vector<uint8_t>(kCluster, fill)) {
                continue;
            }
            ++data_writes;
            for (const RecordedOp& table : journal_.ops) {
                if (table.kind != RecordedOp::kWrite || table.issued < data.issued ||
                    table.offset + table.bytes <= l2 || table.offset >= l2 + kCluster) {
                    continue;
                }
                bool synced = false;
                for (const RecordedOp& f : journal_.ops) {
                    synced = synced || (f.kind == RecordedOp::kFlush && f.issued > data.done &&
                                        f.done < table.issued);
                }
                EXPECT_TRUE(synced)
                    << "the L2 table was written (event " << table.issued
                    << ") before the data of the write at event " << data.issued << " was durable";
            }
        }
        EXPECT_GT(data_writes, 0);
    }

    test::TempDir dir_{test::memory_backed()};
    Clock clock_;
    Journal journal_;
    std::shared_ptr<test::VecNode> storage_;
    std::shared_ptr<Qcow2Node> node_;
};

// A cluster zeroed with its allocation kept (ZERO_RANGE: write_zeroes without unmap) still holds
// the old data; a whole-cluster write into it copies nothing. Its entry must not lose the zero
// flag on disk before the new data is there, or a crash brings back the old data where the
// guest was told (by a completed fsync) that zeros were.
TEST_F(WriteOrderTest, AWriteIntoAZeroedClusterThatKeptItsAllocation) {
    REQUIRE_TOOL("qemu-img");
    open_image("");
    write_cluster(0, 0xaa);
    flush();
    ASSERT_TRUE(run(node_->write_zeroes(0, kCluster, false)).ok());
    flush();
    write_cluster(0, 0xbb);
    flush();
    expect_data_durable_before_l2(0xbb);
    std::vector<uint8_t> back(kCluster);
    ASSERT_TRUE(run(node_->read(0, back)).ok());
    EXPECT_EQ(back, std::vector<uint8_t>(kCluster, 0xbb));
}

// With lazy refcounts no refcount update stands between the data and its L2 entry: a new
// cluster's entry must still wait for the data (a cluster freed and reused would otherwise show
// another offset's old data after a crash).
TEST_F(WriteOrderTest, ANewClusterWithLazyRefcounts) {
    REQUIRE_TOOL("qemu-img");
    open_image(",lazy_refcounts=on");
    write_cluster(0, 0xaa);
    write_cluster(kCluster, 0xcc);
    flush();
    expect_data_durable_before_l2(0xaa);
    expect_data_durable_before_l2(0xcc);
}

// Without lazy refcounts the refcount dependency already syncs first: the rule holds, and
// checking it here makes sure the test itself can tell.
TEST_F(WriteOrderTest, ANewClusterWithRefcountsFirst) {
    REQUIRE_TOOL("qemu-img");
    open_image("");
    write_cluster(0, 0xaa);
    flush();
    expect_data_durable_before_l2(0xaa);
}

// A guest's trim frees many adjacent clusters (a zeroing write that may unmap); the next flush
// gives their space back to the host file. Once per cluster, under the metadata lock, that was
// one punch per cluster (1.6 million for 100 GiB at 64 KiB) while every allocating write and
// flush of the image waited. Adjacent clusters now go as one punch.
TEST_F(WriteOrderTest, FreedClustersGoBackToTheFileInRuns) {
    REQUIRE_TOOL("qemu-img");
    open_image("");
    std::vector<uint8_t> data(4 << 20, 0x77);
    ASSERT_TRUE(run(node_->write(0, data)).ok());
    flush();
    const size_t before = journal_.ops.size();
    ASSERT_TRUE(run(node_->write_zeroes(0, data.size(), true)).ok());
    flush();
    uint64_t punches = 0;
    uint64_t punched_bytes = 0;
    for (size_t i = before; i < journal_.ops.size(); ++i) {
        const RecordedOp& op = journal_.ops[i];
        if (op.kind == RecordedOp::kZero && op.bytes % kCluster == 0) {
            ++punches;
            punched_bytes += op.bytes;
        }
    }
    EXPECT_EQ(punched_bytes, data.size());
    EXPECT_LE(punches, 2U) << "64 clusters freed, punched in " << punches << " calls";
    std::vector<uint8_t> back(data.size());
    ASSERT_TRUE(run(node_->read(0, back)).ok());
    EXPECT_EQ(back, std::vector<uint8_t>(data.size(), 0));
    test::ImageCheck c = test::check_qcow2(storage_->data);
    EXPECT_EQ(c.corruptions, 0U) << c.first_problem;
}

// A new refcount block may land in a range that has a block already (one after a range that
// has none). Its own refcount then lives in that other block, and must be durable before the
// refcount table names the new block: a crash in between left a referenced block with
// refcount 0 (`qemu-img check`: an error), whose cluster QEMU could later hand out as data.
// Every write is checked as the one write a crash kept beyond what was durable when it was
// issued.
TEST_F(WriteOrderTest, ANewRefcountBlockIsCountedBeforeTheTableNamesIt) {
    REQUIRE_TOOL("qemu-img");
    REQUIRE_TOOL("qemu-io");
    // 512-byte clusters and 64-bit refcounts: a refcount block covers 64 clusters (a range).
    constexpr uint64_t kSmall = 512;
    const std::string path = dir_.file("img.qcow2");
    test::must(fmt::format(
        "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 '{}' 64K", path));
    // The L2 table of guest 0-32 KiB exists, its entries reading zeros.
    test::must(fmt::format("qemu-io -f qcow2 -c 'write -z 0 32k' '{}' >/dev/null", path));
    // Range 0 (clusters 0-63) full, range 1 without a block, range 2 with an empty block (at
    // cluster 63). The image ends at cluster 64: a 64-cluster run takes all of range 1, and
    // range 1's new block goes to cluster 128, in range 2.
    const uint64_t reftable = test::be64_at(path, qcow2::kOffRefcountTableOffset);
    const uint64_t block0 = test::be64_at(path, reftable);
    ASSERT_NE(block0, 0U);
    ASSERT_EQ(::truncate(path.c_str(), 64 * kSmall), 0);
    for (uint64_t c = 0; c < 64; ++c) {
        test::put_be64_at(path, block0 + c * 8, 1);  // the unused ones leak: harmless
    }
    test::put_be64_at(path, reftable + 2 * 8, 63 * kSmall);
    open_file(path);
    std::vector<uint8_t> data(64 * kSmall, 0x5a);
    ASSERT_TRUE(run(node_->write(0, data)).ok());
    flush();
    ASSERT_EQ(qcow2::load_be64(storage_->data.data() + reftable + 8), 128 * kSmall)
        << "the new block did not land in range 2: the test no longer covers that case";

    test::CrashView view(&journal_);
    for (size_t i = 0; i < journal_.ops.size(); ++i) {
        const RecordedOp& op = journal_.ops[i];
        if (op.kind != RecordedOp::kWrite) {
            continue;
        }
        const std::vector<size_t>& pending = view.seek(op.issued + 1);
        test::Selection only_this(pending.size(), 0);
        for (size_t p = 0; p < pending.size(); ++p) {
            only_this[p] = pending[p] == i ? ~0ULL : 0;
        }
        test::ImageCheck c = test::check_qcow2(view.content(only_this));
        EXPECT_EQ(c.corruptions, 0U)
            << "a crash keeping only the write issued at event " << op.issued << " (offset "
            << op.offset << ", " << op.bytes << " bytes): " << c.first_problem;
    }
    test::ImageCheck final_check = test::check_qcow2(storage_->data);
    EXPECT_EQ(final_check.corruptions, 0U) << final_check.first_problem;
}

}  // namespace
}  // namespace imgfs
