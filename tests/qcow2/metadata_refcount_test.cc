// The cluster allocator (metadata_refcount.cc) on real images: clusters freed but held back
// from reuse until the tables that dropped them are durable.
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

}  // namespace
}  // namespace imgfs
