// Crafted snapshot tables: what an open and a repair do with them is bounded by the file, not
// by what the table claims. Byte-level fixtures: 65,536 snapshots that all name one 32 MiB L1
// table of 512-byte clusters (over four billion cluster references in all).
#include <chrono>
#include <cstring>
#include <fcntl.h>

#include <gtest/gtest.h>

#include "core/transaction.h"
#include "drivers/file.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "drivers/qcow2/ref_counter.h"
#include "qcow2/image_test_util.h"
#include "test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kCluster = 512;
constexpr uint32_t kSnapshots = 65536;
constexpr uint64_t kSharedL1Offset = 4096 * kCluster;
constexpr uint64_t kSharedL1Bytes = 32ULL << 20;

void put32(std::vector<uint8_t>* b, size_t at, uint32_t v) {
    for (int i = 0; i < 4; ++i) {
        (*b)[at + i] = static_cast<uint8_t>(v >> (24 - 8 * i));
    }
}
void put64(std::vector<uint8_t>* b, size_t at, uint64_t v) {
    put32(b, at, static_cast<uint32_t>(v >> 32));
    put32(b, at + 4, static_cast<uint32_t>(v));
}

// A 64 KiB image: header, L1 (cluster 1), refcount table (2), one refcount block (3) counting
// the first clusters, the snapshot table from cluster 64, the shared L1 table further on.
void write_many_snapshots_image(const std::string& path, bool dirty) {
    std::vector<uint8_t> head(64 * kCluster, 0);
    put32(&head, qcow2::kOffMagic, qcow2::kMagic);
    put32(&head, qcow2::kOffVersion, 3);
    put32(&head, qcow2::kOffClusterBits, 9);
    put64(&head, qcow2::kOffSize, 64 << 10);
    put32(&head, qcow2::kOffL1Size, 4);
    put64(&head, qcow2::kOffL1TableOffset, kCluster);
    put64(&head, qcow2::kOffRefcountTableOffset, 2 * kCluster);
    put32(&head, qcow2::kOffRefcountTableClusters, 1);
    put32(&head, qcow2::kOffNbSnapshots, kSnapshots);
    put64(&head, qcow2::kOffSnapshotsOffset, 64 * kCluster);
    put64(&head, qcow2::kOffIncompatibleFeatures, dirty ? qcow2::kIncompatDirty : 0);
    put32(&head, qcow2::kOffRefcountOrder, 4);
    put32(&head, qcow2::kOffHeaderLength, 104);
    put64(&head, 2 * kCluster, 3 * kCluster);  // refcount table[0]
    for (size_t c = 0; c < 4; ++c) {
        head[3 * kCluster + 2 * c + 1] = 1;  // header, L1, refcount table and block
    }
    // One entry: L1 offset, L1 entries, id and name length 1 and 0, no extra data, id "1".
    std::vector<uint8_t> entry(48, 0);
    put64(&entry, 0, kSharedL1Offset);
    put32(&entry, 8, static_cast<uint32_t>(kSharedL1Bytes / 8));
    entry[13] = 1;
    entry[40] = '1';
    std::vector<uint8_t> table;
    for (uint32_t i = 0; i < kSnapshots; ++i) {
        table.insert(table.end(), entry.begin(), entry.end());
    }
    head.insert(head.end(), table.begin(), table.end());
    test::write_file(path, head);
    ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(kSharedL1Offset + kSharedL1Bytes)), 0);
}

class SnapshotTableTest : public test::LoopTest {
  protected:
    // Opens and loads; the load's status, and how long it took.
    Status load(const std::string& path, bool read_only, std::chrono::milliseconds* took) {
        auto file = FileNode::open(env(), "file", AT_FDCWD, path, {});
        EXPECT_TRUE(file.ok()) << file.error().message();
        qcow2::Options options;
        options.read_only = read_only;
        Transaction tx(&graph_);
        node_ = Qcow2Node::create(env(), "img", &tx, *file, options);
        EXPECT_TRUE(tx.commit().ok());
        const auto start = std::chrono::steady_clock::now();
        Status st = run(node_->load());
        *took = std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::steady_clock::now() - start);
        return st;
    }
    std::shared_ptr<Qcow2Node> node_;
};

// Indexed cluster by cluster, these tables took 41 s to open (and a spread-out variant in a
// sparse file would exhaust memory); as runs they take milliseconds. The bound leaves room for
// a slow sanitizer build while still failing the old code.
TEST_F(SnapshotTableTest, ManySnapshotsNamingOneLargeL1TableOpenQuickly) {
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    write_many_snapshots_image(img, false);
    for (bool read_only : {true, false}) {
        std::chrono::milliseconds took{};
        Status st = load(img, read_only, &took);
        ASSERT_TRUE(st.ok()) << st.error().message();
        EXPECT_LT(took.count(), 8000) << (read_only ? "read-only" : "read-write");
        if (!read_only) {
            use_rw(node_);
            std::vector<uint8_t> buf(4096, 0x5a);
            ASSERT_TRUE(run(node_->write(0, buf)).ok());
            std::vector<uint8_t> got(4096);
            ASSERT_TRUE(run(node_->read(0, got)).ok());
            EXPECT_EQ(got, buf);
        }
        (void)run(node_->close());
        node_.reset();
    }
}

// Repairing a dirty image reads every snapshot's L1 table. Tables that together exceed the file
// can only overlap each other: refused at once, instead of reading 2 TiB.
TEST_F(SnapshotTableTest, ARepairOfOverlappingSnapshotL1TablesIsRefused) {
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    write_many_snapshots_image(img, true);
    std::chrono::milliseconds took{};
    Status st = load(img, false, &took);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EINVAL);
    EXPECT_NE(st.error().message().find("overlap each other"), std::string::npos)
        << st.error().message();
    EXPECT_LT(took.count(), 8000);
    // Nothing was written: the image is still dirty, for a tool that can repair it.
    EXPECT_EQ(test::be64_at(img, qcow2::kOffIncompatibleFeatures), qcow2::kIncompatDirty);
}

TEST(RefCounterTest, ACountPastTheRefcountWidthIsAnError) {
    qcow2::Header h;
    h.cluster_bits = 16;
    h.refcount_order = 0;  // 1-bit refcounts: one reference at most
    h.size = 1 << 20;
    const qcow2::Geometry g = qcow2::Geometry::from(h);
    qcow2::RefCounter counter(g, 1 << 20);
    ASSERT_TRUE(counter.add(0, 65536, "L2 table").ok());
    Status twice = counter.add(0, 65536, "L2 table");
    ASSERT_FALSE(twice.ok());
    EXPECT_NE(twice.error().message().find("referenced more often"), std::string::npos);
    EXPECT_EQ(counter.get(0), 1U);
    h.refcount_order = 4;
    const qcow2::Geometry g16 = qcow2::Geometry::from(h);
    qcow2::RefCounter wide(g16, 1 << 20);
    ASSERT_TRUE(wide.add(65536, 65536, "data cluster", 65535).ok());
    EXPECT_EQ(wide.get(1), 65535U);
    EXPECT_FALSE(wide.add(65536, 1, "data cluster").ok());
}

// A sparse counter counts the clusters it was given and ignores the rest, with memory by
// their number: a file of terabytes costs nothing more.
TEST(RefCounterTest, ASparseCounterCountsOnlyItsClusters) {
    qcow2::Header h;
    h.cluster_bits = 16;
    h.size = 1ULL << 40;
    const qcow2::Geometry g = qcow2::Geometry::from(h);
    const uint64_t file_size = 1ULL << 47;  // far more clusters than a dense count may hold
    ASSERT_FALSE(qcow2::RefCounter::fits(g, file_size).ok());
    qcow2::RefCounter counter(g, file_size, {3, 1ULL << 25});
    ASSERT_TRUE(counter.add(0, 8 * 65536, "L1 table").ok());  // clusters 0-7
    ASSERT_TRUE(counter.add(3 * 65536, 65536, "data cluster", 2).ok());
    ASSERT_TRUE(counter.add((1ULL << 25) * 65536, 100, "data cluster").ok());
    ASSERT_TRUE(counter.add((1ULL << 30) * 65536, 65536, "data cluster").ok());
    EXPECT_EQ(counter.get(3), 3U);
    EXPECT_EQ(counter.get(1ULL << 25), 1U);
    EXPECT_EQ(counter.get(2), 0U) << "not a counted cluster";
    EXPECT_EQ(counter.get(1ULL << 30), 0U) << "not a counted cluster";
    EXPECT_FALSE(counter.add(file_size + (1ULL << 40), 65536, "data cluster").ok())
        << "far past the end of the file";
}

}  // namespace
}  // namespace imgfs
