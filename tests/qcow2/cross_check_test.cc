// The cross-checks of a data mapping (cross_check.cc): a finding is corruption, but a check
// that cannot be made because the storage failed is an I/O error, which must reach the caller
// as one and never mark the image corrupt.
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <sys/stat.h>

#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/file.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "qcow2/fault_stack.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kCluster = 512;  // small clusters: many refcount blocks

class CrossCheckTest : public test::FaultStackTest {
  protected:
    // Loads `img` with nothing in between and closes it again; the load's status.
    Status load(const std::string& img, bool read_only, std::chrono::milliseconds* took = nullptr) {
        auto file = FileNode::open(env(), "file", AT_FDCWD, img, {});
        EXPECT_TRUE(file.ok()) << file.error().message();
        qcow2::Options options;
        options.read_only = read_only;
        Transaction tx(&graph_);
        auto node = Qcow2Node::create(env(), "img", &tx, *file, options);
        EXPECT_TRUE(tx.commit().ok());
        const auto start = std::chrono::steady_clock::now();
        Status st = run(node->load());
        if (took != nullptr) {
            *took = std::chrono::duration_cast<std::chrono::milliseconds>(
                std::chrono::steady_clock::now() - start);
        }
        (void)run(node->close());
        return st;
    }
    // A 4 KiB-cluster image with 0x11 in its first cluster, whose second L2 entry is then set
    // to a preallocated zero cluster at `host(first data cluster, L2 table)`.
    static std::string damaged_zero_entry(const test::TempDir& dir, bool on_metadata) {
        const std::string img = dir.file("img.qcow2");
        test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 '" + img + "' 8M");
        test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 4k' '" + img + "' >/dev/null");
        const uint64_t l2 = test::be64_at(img, test::be64_at(img, 40)) & qcow2::kOffsetMask;
        const uint64_t data = test::be64_at(img, l2) & qcow2::kOffsetMask;
        test::put_be64_at(img, l2 + 8,
                          (on_metadata ? l2 : data) | qcow2::kOflagCopied | qcow2::kOflagZero);
        return img;
    }
    // A 512-byte-cluster image of 1 MiB with 0x11 in its first cluster (L1 entry 0's table).
    static std::string one_table_image(const test::TempDir& dir) {
        const std::string img = dir.file("img.qcow2");
        test::must("qemu-img create -q -f qcow2 -o cluster_size=512 '" + img + "' 1M");
        test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 512' '" + img + "' >/dev/null");
        return img;
    }
    // Sets the refcounts of `clusters` (in the first refcount block; 16-bit counts) to `count`.
    static void set_counts(const std::string& img, std::initializer_list<uint64_t> clusters,
                           uint8_t count) {
        const uint64_t refblock = test::be64_at(img, test::be64_at(img, 48));
        std::vector<uint8_t> bytes = test::read_file(img);
        for (uint64_t cluster : clusters) {
            bytes[refblock + cluster * 2] = 0;
            bytes[refblock + cluster * 2 + 1] = count;
        }
        test::write_file(img, bytes);
    }
    // `img` holds the bytes of `before` at [offset, offset + bytes).
    static void expect_unchanged(const std::string& img, const std::vector<uint8_t>& before,
                                 uint64_t offset, uint64_t bytes, const char* what) {
        const std::vector<uint8_t> after = test::read_file(img);
        ASSERT_GE(after.size(), offset + bytes);
        ASSERT_GE(before.size(), offset + bytes);
        EXPECT_TRUE(std::equal(before.begin() + static_cast<long>(offset),
                               before.begin() + static_cast<long>(offset + bytes),
                               after.begin() + static_cast<long>(offset)))
            << what << " changed";
    }
};

// A write of part of a fresh cluster at the end of the file writes only that part, so the
// file ends inside the cluster. Reading the rest asks the refcount whether the cluster past
// the end is allocated; when that refcount block cannot be read, the read fails with the
// storage's EIO, and the image is not marked corrupt: its metadata is sound.
TEST_F(CrossCheckTest, ARefcountReadErrorIsAnIoErrorNotCorruption) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 '" + img + "' 8M");
    // 1000 KiB of data: the L2 table of 992-1024 KiB is there and partly used.
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 1000k' '" + img + "' >/dev/null");
    const uint64_t guest = 1010 * 1024;
    struct stat st {};
    ASSERT_EQ(::stat(img.c_str(), &st), 0);
    const uint64_t host = static_cast<uint64_t>(st.st_size);  // where the new cluster goes
    ASSERT_EQ(host % kCluster, 0U);
    {
        Stack s = open(img);
        std::vector<uint8_t> data(256, 0x5a);
        ASSERT_TRUE(run(s.node->write(guest, data)).ok());
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();  // its write permission would keep a second open out
    }
    ASSERT_EQ(::stat(img.c_str(), &st), 0);
    ASSERT_EQ(static_cast<uint64_t>(st.st_size), host + 256) << "the file does not end in it";
    // The refcount table is at the header's offset 48; 64 refcounts of 64 bits per block.
    const uint64_t refblock = test::be64_at(img, test::be64_at(img, 48) + host / kCluster / 64 * 8);
    ASSERT_NE(refblock, 0U);

    qcow2::Options small;
    small.refcount_cache_bytes = 4 * kCluster;  // the fewest blocks it keeps
    Stack s = open(img, small);
    // Discards of data far apart touch other refcount blocks: the one of the new cluster
    // (read at open) leaves the cache.
    for (uint64_t g = 0; g < 8; ++g) {
        ASSERT_TRUE(run(s.node->discard(g * 64 * 1024, kCluster)).ok());
    }
    FaultRule rule;
    rule.ops = fault_op::kRead;
    rule.errnum = EIO;
    rule.offset = refblock;
    rule.bytes = kCluster;
    const size_t r = s.fault->add_rule(rule);
    std::vector<uint8_t> back(256);
    Status read = run(s.node->read(guest + 256, back));
    ASSERT_GT(s.fault->fired(r), 0U) << "the read never needed the refcount block";
    ASSERT_FALSE(read.ok());
    EXPECT_EQ(read.error().errnum, EIO);
    EXPECT_EQ(read.error().message().find("corrupt"), std::string::npos) << read.error().message();
    // Storage back: the same read works, and writes are still taken.
    s.fault->clear_rules();
    Status again = run(s.node->read(guest + 256, back));
    ASSERT_TRUE(again.ok()) << again.error().message();
    EXPECT_EQ(back, std::vector<uint8_t>(256, 0));
    std::vector<uint8_t> more(256, 0x6b);
    EXPECT_TRUE(run(s.node->write(guest + 256, more)).ok());
    ASSERT_TRUE(run(s.node->close()).ok());
    // Incompatible feature bit 1 (corrupt) is clear, and QEMU finds nothing wrong.
    EXPECT_EQ(test::be64_at(img, 72) & 2, 0U);
    test::CheckResult c = test::qemu_check(img);
    EXPECT_EQ(c.corruptions, 0U) << c.output;
}

// A write into a preallocated zero cluster reuses the cluster its entry names. On a damaged
// image that cluster may be another range's data (two references, refcount 1) or metadata:
// the write is refused as corruption, as a write in place through such an entry is, instead of
// overwriting the other range or the table.
TEST_F(CrossCheckTest, AWriteIntoAZeroClusterOfAnotherRangeIsRefused) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = damaged_zero_entry(dir, false);
    Stack s = open(img);
    std::vector<uint8_t> b(4096, 0x44);
    Status st = run(s.node->write(4096, b));
    ASSERT_FALSE(st.ok()) << "the write through the shared zero entry went through";
    EXPECT_EQ(st.error().errnum, EIO);
    std::vector<uint8_t> got(4096);
    ASSERT_TRUE(run(s.node->read(0, got)).ok());
    EXPECT_EQ(got[0], 0x11) << "the other range's data was overwritten";
    (void)run(s.node->close());
    users_.clear();
}

TEST_F(CrossCheckTest, AWriteIntoAZeroClusterOnMetadataIsRefused) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = damaged_zero_entry(dir, true);
    const uint64_t l2 = test::be64_at(img, test::be64_at(img, 40)) & qcow2::kOffsetMask;
    {
        Stack s = open(img);
        std::vector<uint8_t> b(4096, 0x44);
        Status st = run(s.node->write(4096, b));
        ASSERT_FALSE(st.ok()) << "the write through an entry on the L2 table went through";
        EXPECT_EQ(st.error().errnum, EIO);
        (void)run(s.node->close());
        users_.clear();
    }
    EXPECT_NE(test::be64_at(img, l2), 0x4444444444444444ULL) << "guest data over the L2 table";
}

// A discard (or a whole-cluster overwrite) drops the reference of the entry it replaces. On a
// damaged image whose entry names the L1 table, that freed the table: its refcount went to 0
// and the next flush punched it, so every mapping was gone after a reopen. It is corruption
// now, found before anything changes.
TEST_F(CrossCheckTest, ADiscardOfAnEntryNamingMetadataIsRefused) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 '" + img + "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 8k' '" + img + "' >/dev/null");
    const uint64_t l1 = test::be64_at(img, 40);
    const uint64_t l2 = test::be64_at(img, l1) & qcow2::kOffsetMask;
    test::put_be64_at(img, l2, l1 | qcow2::kOflagCopied);  // guest cluster 0 -> the L1 table
    for (bool whole_overwrite : {false, true}) {
        Stack s = open(img);
        Status st = whole_overwrite ? run(s.node->write(0, std::vector<uint8_t>(4096, 0x22)))
                                    : run(s.node->discard(0, 4096));
        ASSERT_FALSE(st.ok()) << "the reference to the L1 table was dropped";
        EXPECT_EQ(st.error().errnum, EIO);
        (void)run(s.node->close());
        users_.clear();
        EXPECT_EQ(test::be64_at(img, l1) & qcow2::kOffsetMask, l2) << "the L1 table was lost";
        // The corrupt bit is set now; cleared for the second case.
        std::vector<uint8_t> header = test::read_file(img);
        header[79] &= static_cast<uint8_t>(~2U);  // incompatible feature bit 1: corrupt
        test::write_file(img, header);
    }
    // Guest cluster 1 still maps its data.
    const std::vector<uint8_t> raw = test::qemu_convert_raw(img);
    EXPECT_EQ(std::vector<uint8_t>(raw.begin() + 4096, raw.begin() + 8192),
              std::vector<uint8_t>(4096, 0x11));
}

// A refcount table whose only block sits at table index 2^19, for 2 MiB clusters with 1-bit
// refcounts: clusters from 2^43 up, host offsets from 2^64. The allocator took a free cluster
// there, the offset wrapped to 0, and the first write zeroed the header. Now an allocation
// that would end past 56-bit host offsets fails with EFBIG, and the image is untouched.
TEST_F(CrossCheckTest, ARefcountTableReachingPast56BitOffsetsIsRefusedNotWrapped) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=2M,refcount_bits=1 '" + img + "' 64M");
    constexpr uint64_t kBig = 2 << 20;
    const uint64_t table = 8 * kBig;  // four clusters of table entries, then block B
    const uint64_t block = table + 4 * kBig;
    std::vector<uint8_t> bytes = test::read_file(img);
    bytes.resize(block + kBig, 0);
    bytes[block + kBig - 1] = 0xFF;  // B counts its last clusters as used
    test::write_file(img, bytes);
    test::put_be64_at(img, 48, table);  // refcount_table_offset
    test::put_be64_at(img, 56, (4ULL << 32) | (test::be64_at(img, 56) & 0xFFFFFFFFULL));
    test::put_be64_at(img, table + (1ULL << 19) * 8, block);  // entry 2^19 -> B; entry 0 empty
    const uint32_t magic = static_cast<uint32_t>(test::be64_at(img, 0) >> 32);
    {
        Stack s = open(img);
        Status st = run(s.node->write(0, std::vector<uint8_t>(4096, 0x22)));
        ASSERT_FALSE(st.ok()) << "a cluster past 2^56 bytes was handed out";
        EXPECT_EQ(st.error().errnum, EFBIG) << st.error().message();
        (void)run(s.node->close());
        users_.clear();
    }
    EXPECT_EQ(static_cast<uint32_t>(test::be64_at(img, 0) >> 32), magic) << "header overwritten";
}

// A refcount block that lies on the L1 table: counting a new cluster in it changed an L1 entry
// in memory, and the flush wrote the "block" over the table (guest 512 MiB on mapped through
// the refcount table). Such a block is corruption now, found before anything is written.
TEST_F(CrossCheckTest, ARefcountBlockLyingOnTheL1TableIsNotWrittenOverIt) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 '" + img + "' 1G");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 4k' '" + img + "' >/dev/null");
    const uint64_t l1 = test::be64_at(img, 40);
    const uint64_t reftable = test::be64_at(img, 48);
    test::put_be64_at(img, reftable, l1);  // entry 0's block is the L1 table
    const std::vector<uint8_t> before = test::read_file(img);
    {
        Stack s = open(img);
        Status st = run(s.node->write(1 << 20, std::vector<uint8_t>(4096, 0x22)));
        ASSERT_FALSE(st.ok()) << "a count went into the L1 table";
        EXPECT_EQ(st.error().errnum, EIO) << st.error().message();
        (void)run(s.node->close());
        users_.clear();
    }
    expect_unchanged(img, before, l1, 4096, "the L1 table");
}

// Two active L1 entries naming one L2 table, COPIED on one of them (a malformed image). A write
// through the first changed the table in place, under the second range too; a write through the
// second copied the table, with that first write's link in the copy, and dropped the table's
// count to 0 while the first entry still named it: the first write was lost at the next read,
// and its cluster was referenced twice. Writes through either entry are refused; reads work.
TEST_F(CrossCheckTest, AnL2TableNamedByTwoL1EntriesIsNotWrittenThrough) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = one_table_image(dir);
    const uint64_t l1 = test::be64_at(img, 40);
    const uint64_t first = test::be64_at(img, l1);
    ASSERT_NE(first & qcow2::kOflagCopied, 0U);
    test::put_be64_at(img, l1 + 8, first & ~qcow2::kOflagCopied);  // L1[1]: 32 KiB on
    const std::vector<uint8_t> before = test::read_file(img);
    {
        Stack s = open(img);
        std::vector<uint8_t> shown(512);
        ASSERT_TRUE(run(s.node->read(32768, shown)).ok());
        EXPECT_EQ(shown, std::vector<uint8_t>(512, 0x11)) << "reads through either entry work";
        // Through the entry with COPIED (in place), then the other (a copy of the table); the
        // first refusal marks the image corrupt, which refuses the second anyway.
        for (uint64_t at : {uint64_t{4096}, uint64_t{32768 + 4096}}) {
            Status st = run(s.node->write(at, std::vector<uint8_t>(512, 0x22)));
            ASSERT_FALSE(st.ok()) << "a write through L1 entry " << at / 32768;
            EXPECT_EQ(st.error().errnum, EIO) << st.error().message();
            if (at == 4096) {
                EXPECT_NE(st.error().message().find("is the L2 table of L1 entry 1 too"),
                          std::string::npos)
                    << st.error().message();
            }
        }
        (void)run(s.node->close());
        users_.clear();
    }
    expect_unchanged(img, before, first & qcow2::kOffsetMask, 512, "the shared L2 table");
}

// Three entries naming one table, COPIED on the middle one only, counts of 3. A write through
// the first copies the table (the count covers all three). The middle one then still shares
// the table with the third: its write in place would change the third's range. It was checked
// against the first entry only (which had moved), and went through.
TEST_F(CrossCheckTest, AnL2TableNamedByThreeL1EntriesIsNotWrittenInPlace) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = one_table_image(dir);
    const uint64_t l1 = test::be64_at(img, 40);
    const uint64_t l2 = test::be64_at(img, l1) & qcow2::kOffsetMask;
    const uint64_t data = test::be64_at(img, l2) & qcow2::kOffsetMask;
    test::put_be64_at(img, l1, l2);                            // L1[0]: 0 on
    test::put_be64_at(img, l1 + 8, l2 | qcow2::kOflagCopied);  // L1[1]: 32 KiB on
    test::put_be64_at(img, l1 + 16, l2);                       // L1[2]: 64 KiB on
    test::put_be64_at(img, l2, data);
    set_counts(img, {l2 / 512, data / 512}, 3);
    {
        Stack s = open(img);
        ASSERT_TRUE(run(s.node->write(4096, std::vector<uint8_t>(512, 0x22))).ok());
        Status st = run(s.node->write(32768 + 4096, std::vector<uint8_t>(512, 0x33)));
        EXPECT_FALSE(st.ok()) << "a write in place into a table L1 entry 2 names too";
        if (!st.ok()) {
            EXPECT_NE(st.error().message().find("is the L2 table of L1 entry 2 too"),
                      std::string::npos)
                << st.error().message();
        }
        std::vector<uint8_t> shown(512);
        ASSERT_TRUE(run(s.node->read(65536 + 4096, shown)).ok());
        EXPECT_EQ(shown, std::vector<uint8_t>(512, 0)) << "L1 entry 2's range changed";
        ASSERT_TRUE(run(s.node->read(65536, shown)).ok());
        EXPECT_EQ(shown, std::vector<uint8_t>(512, 0x11));
        (void)run(s.node->close());
        users_.clear();
    }
}

// The same sharing with COPIED on neither entry and counts that cover both (the table's and its
// data clusters' counts are 2): a consistent image, which qemu-img check accepts. A write
// through either entry copies the table, as for a table shared with a snapshot.
TEST_F(CrossCheckTest, AnL2TableNamedByTwoL1EntriesWithCountsOfTwoIsCopiedOnWrite) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = one_table_image(dir);
    const uint64_t l1 = test::be64_at(img, 40);
    const uint64_t l2 = test::be64_at(img, l1) & qcow2::kOffsetMask;
    const uint64_t data = test::be64_at(img, l2) & qcow2::kOffsetMask;
    test::put_be64_at(img, l1, l2);  // neither entry has COPIED, nor has the data's entry
    test::put_be64_at(img, l1 + 8, l2);
    test::put_be64_at(img, l2, data);
    set_counts(img, {l2 / 512, data / 512}, 2);
    ASSERT_EQ(test::qemu_check(img).corruptions, 0U) << test::qemu_check(img).output;
    {
        Stack s = open(img);
        ASSERT_TRUE(run(s.node->write(4096, std::vector<uint8_t>(512, 0x22))).ok());
        ASSERT_TRUE(run(s.node->write(32768 + 4096, std::vector<uint8_t>(512, 0x33))).ok());
        std::vector<uint8_t> shown(512);
        ASSERT_TRUE(run(s.node->read(32768, shown)).ok());
        EXPECT_EQ(shown, std::vector<uint8_t>(512, 0x11));
        ASSERT_TRUE(run(s.node->read(4096, shown)).ok());
        EXPECT_EQ(shown, std::vector<uint8_t>(512, 0x22));
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
    const test::CheckResult c = test::qemu_check(img);
    EXPECT_EQ(c.corruptions, 0U) << c.output;
    EXPECT_EQ(c.leaks, 0U) << c.output;
}

// A crash with lazy refcounts leaves the dirty bit set and a new cluster's count in memory
// only; the file may end inside that cluster (a partial write of it). A read-only open does
// not repair the counts, so the check of the cluster holding the end of the file found count
// 0 and called the mapping corrupt: the read failed with EIO where QEMU returns the data.
TEST_F(CrossCheckTest, AReadOnlyOpenOfADirtyImageReadsTheClusterAtTheEndOfTheFile) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o lazy_refcounts=on '" + img + "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 4k' '" + img + "' >/dev/null");
    const uint64_t l2 = test::be64_at(img, test::be64_at(img, 40)) & qcow2::kOffsetMask;
    const uint64_t data = test::be64_at(img, l2) & qcow2::kOffsetMask;
    const uint64_t refblock = test::be64_at(img, test::be64_at(img, 48));
    std::vector<uint8_t> bytes = test::read_file(img);
    ASSERT_GE(bytes.size(), data + 4096);
    bytes.resize(data + 4096);                              // the file ends inside the data cluster
    const uint64_t count_at = refblock + (data >> 16) * 2;  // 16-bit counts, 64 KiB clusters
    bytes[count_at] = bytes[count_at + 1] = 0;              // its count never reached the disk
    bytes[79] |= 1;                                         // incompatible bit 0: dirty
    test::write_file(img, bytes);
    auto file = FileNode::open(env(), "file", AT_FDCWD, img, {});
    ASSERT_TRUE(file.ok()) << file.error().message();
    Transaction tx(&graph_);
    qcow2::Options ro;
    ro.read_only = true;
    auto node = Qcow2Node::create(env(), "img", &tx, *file, ro);
    ASSERT_TRUE(tx.commit().ok());
    ASSERT_TRUE(run(node->load()).ok());
    std::vector<uint8_t> got(4096);
    Status st = run(node->read(0, got));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(got, std::vector<uint8_t>(4096, 0x11));
    (void)run(node->close());
}

// A discard of a whole, fully mapped disk (fstrim, blkdiscard) goes one L2 table at a time with
// the cache trimmed after each: it kept every table it touched dirty in memory until the end
// (16 GiB of tables for 1 TiB of 512-byte clusters).
TEST_F(CrossCheckTest, ADiscardOfTheWholeDiskKeepsTheTableCacheBounded) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=512 '" + img + "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 8M' '" + img + "' >/dev/null");
    qcow2::Options small;
    small.l2_cache_bytes = 16 * kCluster;  // 16 of the image's 256 tables
    {
        Stack s = open(img, small);
        const qcow2::TableCache& cache = s.node->metadata()->l2_cache();
        ASSERT_TRUE(run(s.node->discard(0, 8 << 20)).ok());
        EXPECT_LE(cache.peak_size(), cache.capacity() + 1);
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
    EXPECT_EQ(test::qemu_check(img).exit_code, 0);
    EXPECT_EQ(test::qemu_convert_raw(img), std::vector<uint8_t>(8 << 20, 0));
}

// Crafted images: 64 KiB clusters with 1-bit refcounts, a one-cluster refcount table whose
// entry 0 names the real block, and every other entry an all-zero block: one block for all,
// or a hole of its own in a 512 MiB sparse file. Each entry's block was decoded in full for
// the allocation end, with no await between them: 35 s of a stalled event loop for the 320
// KiB of the first (measured), hours for a larger table. A block is now read once, and its
// counts decoded only up to its last non-zero byte.
TEST_F(CrossCheckTest, TheAllocationEndScanIsBoundedByTheFileNotByTheTable) {
    for (const bool own_holes : {false, true}) {
        SCOPED_TRACE(own_holes ? "a hole for each entry" : "one block for all entries");
        test::TempDir dir(test::memory_backed());
        const std::string img = dir.file("img.qcow2");
        constexpr uint64_t kCs = 64 << 10;
        constexpr uint64_t kEntries = kCs / 8;
        std::vector<uint8_t> bytes(5 * kCs, 0);
        auto put32 = [&](uint64_t at, uint32_t v) {
            for (int i = 0; i < 4; ++i) {
                bytes[at + i] = static_cast<uint8_t>(v >> (24 - 8 * i));
            }
        };
        auto put64 = [&](uint64_t at, uint64_t v) {
            put32(at, static_cast<uint32_t>(v >> 32));
            put32(at + 4, static_cast<uint32_t>(v));
        };
        put32(0, 0x514649fb);   // magic
        put32(4, 3);            // version
        put32(20, 16);          // cluster_bits
        put64(24, 1ULL << 30);  // virtual size
        put32(36, 2);           // l1_size
        put64(40, 4 * kCs);     // l1_table_offset
        put64(48, kCs);         // refcount_table_offset
        put32(56, 1);           // refcount_table_clusters
        put32(96, 0);           // refcount_order: 1-bit counts
        put32(100, 104);        // header_length
        put64(kCs, 3 * kCs);    // entry 0: the real block
        for (uint64_t i = 1; i < kEntries; ++i) {
            put64(kCs + i * 8, own_holes ? (4 + i) * kCs : 2 * kCs);
        }
        bytes[3 * kCs] = 0x1F;  // clusters 0-4 in use
        test::write_file(img, bytes);
        if (own_holes) {
            ASSERT_EQ(::truncate(img.c_str(), static_cast<off_t>((4 + kEntries) * kCs)), 0);
        }
        std::chrono::milliseconds took{};
        Status st = load(img, false, &took);
        ASSERT_TRUE(st.ok()) << st.error().message();
        EXPECT_LT(took.count(), 3000) << "the open decoded every table entry's block";
    }
}

// A refcount table entry naming an offset just below 2^64: the bounds check added the cluster
// size, wrapped to a small number and passed, and the block read then failed, so the image
// could not be opened for writing at all. The entry is damage past the end of the file, as
// any other far offset, and the rest of the image is written as usual.
TEST_F(CrossCheckTest, ARefcountTableEntryNearTwoToThe64IsNotAWrappedOffset) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 '" + img + "' 64M");
    const uint64_t reftable = test::be64_at(img, 48);
    test::put_be64_at(img, reftable + 8, 0xFFFFFFFFFFFF0000ULL);  // entry 1: host 2 GiB on
    Status loaded = load(img, false);
    ASSERT_TRUE(loaded.ok()) << loaded.error().message();
    {
        Stack s = open(img);
        ASSERT_TRUE(run(s.node->write(0, std::vector<uint8_t>(4096, 0x22))).ok());
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
    EXPECT_EQ(test::qemu_convert_raw(img).at(4095), 0x22);
}

// The L1 table and the refcount table are written in place. One sharing a cluster with the
// other, with the snapshot table or with a snapshot's L1 table was written through: an L2
// table's offset landed in the refcount table (qemu-img check: "refcount block ... is outside
// image"), or a snapshot changed. Such an image is corruption at a writable open now, marked
// as such before anything else is written, and it still opens read-only.
TEST_F(CrossCheckTest, HeaderTablesSharingAClusterAreCorruptionAtAWritableOpen) {
    REQUIRE_TOOL("qemu-img");
    for (const char* layout : {"L1 on the refcount table", "snapshot L1 on the L1 table"}) {
        SCOPED_TRACE(layout);
        test::TempDir dir(test::memory_backed());
        const std::string img = dir.file("img.qcow2");
        test::must("qemu-img create -q -f qcow2 '" + img + "' 1G");
        test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 64k' '" + img + "' >/dev/null");
        const uint64_t l1 = test::be64_at(img, 40);
        if (std::string(layout) == "L1 on the refcount table") {
            test::put_be64_at(img, 40, test::be64_at(img, 48));
        } else {
            test::must("qemu-img snapshot -c s1 '" + img + "'");
            const uint64_t table = test::be64_at(img, 64);  // snapshots_offset
            test::put_be64_at(img, table, l1);              // entry 0's L1 table
        }
        const std::vector<uint8_t> before = test::read_file(img);
        Status st = load(img, false);
        ASSERT_FALSE(st.ok()) << "opened for writing";
        EXPECT_EQ(st.error().errnum, EIO);
        EXPECT_NE(st.error().message().find("share a cluster"), std::string::npos)
            << st.error().message();
        EXPECT_NE(test::be64_at(img, 72) & qcow2::kIncompatCorrupt, 0U) << "not marked corrupt";
        expect_unchanged(img, before, 65536, before.size() - 65536, "past the header");
        Status read_only = load(img, true);
        EXPECT_TRUE(read_only.ok()) << read_only.error().message();
    }
}

}  // namespace
}  // namespace imgfs
