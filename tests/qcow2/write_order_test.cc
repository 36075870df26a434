// The metadata write order's first rule, checked on what reaches the storage: an L2 entry that
// points at data a write just put there reaches the storage only after that data is durable (a
// flush issued after the data write completed has completed). The crash harness checks the
// same through crash states, but its random 512-byte writes nearly always copy on write; these
// are the aligned whole-cluster writes that do not.
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

}  // namespace
}  // namespace imgfs
