// The cluster allocator (metadata_refcount.cc) on real images: clusters freed but held back
// from reuse until the tables that dropped them are durable.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "drivers/qcow2/metadata.h"
#include "qcow2/fault_stack.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

class MetadataRefcountTest : public test::FaultStackTest {
  protected:
    // A 64 MiB image of 4 KiB clusters whose first 8 MiB (2048 clusters) hold data.
    std::string image_with_data(const test::TempDir& dir, bool lazy_refcounts) {
        const std::string img = dir.file("img.qcow2");
        test::must(std::string("qemu-img create -q -f qcow2 -o cluster_size=4096") +
                   (lazy_refcounts ? ",lazy_refcounts=on" : "") + " '" + img + "' 64M");
        test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 8M' '" + img + "' >/dev/null");
        return img;
    }
};

// With lazy refcounts, a trim frees clusters that stay held back until the next flush (their
// L2 entries must be durable before they are reused). Every allocation after it walked all of
// them again: after a large trim, millions of lookups per write until the guest flushed. Now a
// scan steps over them once, and the flush makes them reusable again.
TEST_F(MetadataRefcountTest, ClustersHeldBackAfterATrimAreWalkedOnce) {
    REQUIRE_TOOL("qemu-img");
    REQUIRE_TOOL("qemu-io");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_data(dir, true);
    {
        Stack s = open(img);
        qcow2::Metadata* meta = s.node->metadata();
        ASSERT_TRUE(run(s.node->write_zeroes(0, 8 << 20, true)).ok());  // 2048 clusters held back
        const uint64_t end_before = meta->allocated_clusters_hint();
        const uint64_t scanned_before = meta->clusters_scanned();
        std::vector<uint8_t> block(4096, 0x22);
        constexpr int kWrites = 64;
        for (int i = 0; i < kWrites; ++i) {  // each allocates one cluster
            ASSERT_TRUE(run(s.node->write((16 << 20) + uint64_t(i) * 8192, block)).ok());
        }
        const uint64_t scanned = meta->clusters_scanned() - scanned_before;
        EXPECT_LT(scanned, 2048U + 4 * kWrites)
            << "the held-back clusters were walked again by every allocation";
        // Nothing held back was handed out before the flush.
        EXPECT_GE(meta->allocated_clusters_hint(), end_before + kWrites);
        ASSERT_TRUE(run(s.node->flush()).ok());
        // After it, they are found again: the file does not grow for new data.
        const uint64_t end_flushed = meta->allocated_clusters_hint();
        for (int i = 0; i < kWrites; ++i) {
            ASSERT_TRUE(run(s.node->write((32 << 20) + uint64_t(i) * 8192, block)).ok());
        }
        EXPECT_EQ(meta->allocated_clusters_hint(), end_flushed)
            << "the clusters freed by the trim were not reused after the flush";
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
    test::CheckResult chk = test::qemu_check(img);
    EXPECT_EQ(chk.corruptions, 0U) << chk.output;
    EXPECT_EQ(chk.check_errors, 0U) << chk.output;
    std::vector<uint8_t> raw = test::qemu_convert_raw(img);
    EXPECT_EQ(raw[0], 0);
    EXPECT_EQ(raw[16 << 20], 0x22);
    EXPECT_EQ(raw[32 << 20], 0x22);
}

// The same trim while a read is in flight: the trimmed clusters are held for that read too.
// When it ended, the hint went back to the lowest of them although the flush still held them
// all, and the next allocation walked them all again (each time the oldest read ended).
TEST_F(MetadataRefcountTest, AReadEndingDoesNotSendTheAllocatorBackOverHeldClusters) {
    REQUIRE_TOOL("qemu-img");
    REQUIRE_TOOL("qemu-io");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_data(dir, true);
    Stack s = open(img);
    qcow2::Metadata* meta = s.node->metadata();
    const uint64_t read = meta->begin_data_read();  // a read of some cluster, still running
    ASSERT_TRUE(run(s.node->write_zeroes(0, 8 << 20, true)).ok());
    const uint64_t scanned_before = meta->clusters_scanned();
    std::vector<uint8_t> block(4096, 0x22);
    for (int i = 0; i < 64; ++i) {
        if (i == 32) {
            meta->end_data_read(read);
        }
        ASSERT_TRUE(run(s.node->write((16 << 20) + uint64_t(i) * 8192, block)).ok());
    }
    EXPECT_LT(meta->clusters_scanned() - scanned_before, 2048U + 4 * 64)
        << "the end of the read sent the allocator back over the held clusters";
    ASSERT_TRUE(run(s.node->close()).ok());
    users_.clear();
}

// Without lazy refcounts the trimmed clusters are held only for the read (the tables that
// dropped them are durable at the next allocation). Once the read ends they are reused: the
// allocator's hint had moved past them while they were held.
TEST_F(MetadataRefcountTest, ClustersHeldForAReadAreReusedOnceItEnds) {
    REQUIRE_TOOL("qemu-img");
    REQUIRE_TOOL("qemu-io");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_data(dir, false);
    Stack s = open(img);
    qcow2::Metadata* meta = s.node->metadata();
    const uint64_t read = meta->begin_data_read();
    ASSERT_TRUE(run(s.node->write_zeroes(0, 8 << 20, true)).ok());
    std::vector<uint8_t> block(4096, 0x22);
    ASSERT_TRUE(run(s.node->write(16 << 20, block)).ok());  // not into a held cluster
    meta->end_data_read(read);
    const uint64_t end = meta->allocated_clusters_hint();
    for (int i = 1; i < 64; ++i) {
        ASSERT_TRUE(run(s.node->write((16 << 20) + uint64_t(i) * 8192, block)).ok());
    }
    EXPECT_EQ(meta->allocated_clusters_hint(), end)
        << "the clusters held for the read were not reused after it ended";
    ASSERT_TRUE(run(s.node->close()).ok());
    users_.clear();
}

// A refcount table of 8193 clusters of 512 bytes (just over half the 8 MiB limit; QEMU and
// the repair size tables exactly) that is full: 512-byte clusters with 64-bit counts, so its
// last entry covers a host offset of 16 GiB (a sparse file). Growing it doubled the size
// past the limit and failed with EFBIG, although a table of the largest size fits. It grows
// to exactly the limit now.
TEST_F(MetadataRefcountTest, AFullTableOverHalfTheLimitGrowsToTheLimit) {
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    constexpr uint64_t kCs = 512;
    constexpr uint64_t kPerBlock = kCs / 8;  // 64-bit counts
    constexpr uint64_t kTableClusters = 8193;
    constexpr uint64_t kTableEntries = kTableClusters * kCs / 8;
    constexpr uint64_t kLowBlocks = 131;  // cover the clusters up to 8384
    constexpr uint64_t kFirstBlock = 2 + kTableClusters;
    const uint64_t far_block = kTableEntries * kPerBlock - 1;  // counts itself, last entry
    std::vector<uint8_t> head((kFirstBlock + kLowBlocks) * kCs, 0);
    auto put = [](std::vector<uint8_t>* b, uint64_t at, uint64_t v, int bytes) {
        for (int i = 0; i < bytes; ++i) {
            (*b)[at + i] = static_cast<uint8_t>(v >> (8 * (bytes - 1 - i)));
        }
    };
    put(&head, 0, 0x514649fb, 4);
    put(&head, 4, 3, 4);
    put(&head, 20, 9, 4);        // cluster_bits
    put(&head, 24, 1 << 20, 8);  // 1 MiB disk
    put(&head, 36, 32, 4);       // l1_size
    put(&head, 40, kCs, 8);      // L1 table in cluster 1
    put(&head, 48, 2 * kCs, 8);  // refcount table from cluster 2
    put(&head, 56, kTableClusters, 4);
    put(&head, 96, 6, 4);     // refcount_order: 64-bit counts
    put(&head, 100, 104, 4);  // header_length
    for (uint64_t k = 0; k < kLowBlocks; ++k) {
        put(&head, 2 * kCs + k * 8, (kFirstBlock + k) * kCs, 8);
    }
    put(&head, 2 * kCs + (kTableEntries - 1) * 8, far_block * kCs, 8);
    // Every cluster of the low blocks' ranges in use (the last ones leaked), so nothing inside
    // the file is free and the next cluster comes from the end.
    for (uint64_t c = 0; c < kLowBlocks * kPerBlock; ++c) {
        put(&head, (kFirstBlock + c / kPerBlock) * kCs + (c % kPerBlock) * 8, 1, 8);
    }
    std::vector<uint8_t> far(kCs, 0);
    for (uint64_t i = 0; i < kPerBlock; ++i) {
        put(&far, i * 8, 1, 8);  // its range in use (leaked), itself included
    }
    test::write_file(img, head);
    {
        int fd = ::open(img.c_str(), O_WRONLY);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::pwrite(fd, far.data(), kCs, static_cast<off_t>(far_block * kCs)),
                  static_cast<ssize_t>(kCs));
        ::close(fd);
    }
    {
        Stack s = open(img);
        Status st = run(s.node->write(0, std::vector<uint8_t>(kCs, 0x33)));
        ASSERT_TRUE(st.ok()) << st.error().message();
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
    EXPECT_EQ(test::be64_at(img, 56) >> 32, qcow2::kMaxRefcountTableBytes / kCs)
        << "refcount_table_clusters";
    {
        Stack s = open(img);
        std::vector<uint8_t> back(kCs);
        ASSERT_TRUE(run(s.node->read(0, back)).ok());
        EXPECT_EQ(back, std::vector<uint8_t>(kCs, 0x33));
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
}

}  // namespace
}  // namespace imgfs
