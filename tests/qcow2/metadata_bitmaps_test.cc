// Dropping persistent bitmaps when an image becomes writable (metadata_bitmaps.cc). imgfs keeps
// no bitmap up to date and clears autoclear bit 0; QEMU then counted the bitmaps' clusters as
// leaked, and `qemu-img check` failed on every image with a bitmap imgfs had written. The
// bitmaps now go whole: nothing leaks, nothing else is freed, and a failure frees nothing.
#include <filesystem>

#include <gtest/gtest.h>

#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/file.h"
#include "drivers/qcow2/bitmaps.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "qcow2/fault_stack.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kAutoclearAt = 88;
constexpr uint64_t kIncompatibleAt = 72;
constexpr uint64_t kCluster = 64 * 1024;

Task<void> write_into(Node* node, uint64_t offset, Status* out) {
    std::vector<uint8_t> b(4096, 0x5a);
    *out = co_await node->write(offset, b);
}

// An image with two persistent bitmaps whose dirty bits are set (so they own data clusters),
// and 3 MiB of data.
std::string image_with_bitmaps(const test::TempDir& dir, const std::string& options = "",
                               const std::string& size = "16M",
                               const std::string& fine_granularity = "512") {
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=65536" + options + " '" + img + "' " +
               size);
    test::must("qemu-img bitmap --add '" + img + "' b0");
    test::must("qemu-img bitmap --add -g " + fine_granularity + " '" + img + "' b1");
    test::must("qemu-io -f qcow2 -c 'write -P 7 0 1M' -c 'write -P 8 8M 2M' '" + img +
               "' >/dev/null");
    return img;
}

qcow2::Header header_of(const std::string& img) {
    std::vector<uint8_t> bytes = test::read_file(img);
    const uint64_t size = bytes.size();
    bytes.resize(kCluster);
    auto h = qcow2::parse_header(bytes, size, img);
    EXPECT_TRUE(h.ok()) << h.error().message();
    return h.ok() ? *h : qcow2::Header{};
}

bool has_bitmaps_extension(const std::string& img) {
    for (const qcow2::Extension& e : header_of(img).other_extensions) {
        if (e.type == qcow2::kExtBitmaps) {
            return true;
        }
    }
    return false;
}

// Where the first bitmap's table is.
uint64_t first_bitmap_table(const std::string& img) {
    for (const qcow2::Extension& e : header_of(img).other_extensions) {
        if (e.type == qcow2::kExtBitmaps) {
            const uint64_t directory = qcow2::load_be64(e.data.data() + 16);
            return test::be64_at(img, directory);
        }
    }
    ADD_FAILURE() << "no bitmaps extension";
    return 0;
}

void expect_clean(const std::string& img) {
    test::CheckResult c = test::qemu_check(img);
    EXPECT_EQ(c.exit_code, 0) << c.output;
    EXPECT_EQ(c.corruptions, 0U) << c.output;
    EXPECT_EQ(c.leaks, 0U) << c.output;
}

class MetadataBitmapsTest : public test::FaultStackTest {
  protected:
    // Opens `img` writable, writes 4 KiB at 4 MiB, closes.
    void write_once(const std::string& img, qcow2::Options options = {}) {
        Stack s = open(img, options);
        ASSERT_TRUE(s.node) << "not opened";
        Status wrote;
        run(write_into(s.node.get(), 4 << 20, &wrote));
        EXPECT_TRUE(wrote.ok()) << wrote.error().message();
        EXPECT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
};

TEST_F(MetadataBitmapsTest, WritingDropsTheBitmapsAndLeaksNothing) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir);
    expect_clean(img);
    std::vector<uint8_t> expected = test::qemu_convert_raw(img);
    std::fill_n(expected.begin() + (4 << 20), 4096, 0x5a);
    write_once(img);
    expect_clean(img);
    EXPECT_FALSE(has_bitmaps_extension(img));
    EXPECT_EQ(test::be64_at(img, kAutoclearAt), 0U);
    EXPECT_EQ(test::first_difference(test::qemu_convert_raw(img), expected), -1);
}

// A dirty image is repaired on open; the repair counts nothing of the bitmaps, so their
// clusters come out free, and the extension must not stay to name them.
TEST_F(MetadataBitmapsTest, ARepairedDirtyImageKeepsNoBitmapsInFreeClusters) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir, ",lazy_refcounts=on");
    test::put_be64_at(img, kIncompatibleAt, test::be64_at(img, kIncompatibleAt) | 1);
    write_once(img);
    expect_clean(img);
    EXPECT_FALSE(has_bitmaps_extension(img));
}

// An image too large for the open-time reference count in memory (here a 600 GiB disk with an
// internal snapshot: 75 MiB of snapshot L1 entries to walk). Its bitmaps' clusters leaked; a
// count of just those clusters frees them.
TEST_F(MetadataBitmapsTest, ALargeImageLeaksNothingEither) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir, "", "600G");
    test::must("qemu-img snapshot -c s1 '" + img + "'");
    write_once(img);
    expect_clean(img);
    EXPECT_FALSE(has_bitmaps_extension(img));
}

// Past the bound on the L2 tables the check reads (one read each, under the metadata lock:
// 8,192 by default), the check is not made and the clusters stay allocated. Here the bound is
// 0 and the image has one table.
TEST_F(MetadataBitmapsTest, PastTheWalkBoundTheClustersStayAllocated) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir);
    qcow2::Options bounded;
    bounded.bitmap_check_max_tables = 0;
    write_once(img, bounded);
    test::CheckResult c = test::qemu_check(img);
    EXPECT_EQ(c.corruptions, 0U) << c.output;
    EXPECT_GT(c.leaks, 0U) << c.output;
    EXPECT_FALSE(has_bitmaps_extension(img));
}

// The header is rewritten with a shorter extension list; the backing file name stays where it
// was, so a torn write cannot leave the offset pointing into other bytes.
TEST_F(MetadataBitmapsTest, TheBackingNameStaysInPlace) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    test::must("qemu-img create -q -f qcow2 '" + dir.file("base.qcow2") + "' 16M");
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 '" + img + "'");
    test::must("qemu-img bitmap --add '" + img + "' b0");
    test::must("qemu-io -f qcow2 -c 'write -P 7 0 1M' '" + img + "' >/dev/null");
    const uint64_t name_at = test::be64_at(img, qcow2::kOffBackingFileOffset);
    write_once(img);
    expect_clean(img);
    EXPECT_FALSE(has_bitmaps_extension(img));
    EXPECT_EQ(test::be64_at(img, qcow2::kOffBackingFileOffset), name_at);
    EXPECT_EQ(header_of(img).backing_file, "base.qcow2");
}

// A malformed bitmap table entry naming a cluster of guest data: freeing what the bitmaps name
// would have freed live data. Only clusters nothing else references are freed.
TEST_F(MetadataBitmapsTest, ABitmapClusterThatIsAlsoGuestDataIsNotFreed) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir);
    const uint64_t l2 = test::be64_at(img, test::be64_at(img, 40)) & qcow2::kOffsetMask;
    const uint64_t guest_data = test::be64_at(img, l2) & qcow2::kOffsetMask;
    ASSERT_NE(guest_data, 0U);
    test::put_be64_at(img, first_bitmap_table(img), guest_data);
    const std::vector<uint8_t> before = test::qemu_convert_raw(img);
    write_once(img);
    test::CheckResult c = test::qemu_check(img);
    EXPECT_EQ(c.corruptions, 0U) << c.output;
    EXPECT_LE(c.leaks, 1U) << "only the table entry's old cluster" << c.output;
    std::vector<uint8_t> after = test::qemu_convert_raw(img);
    EXPECT_EQ(
        test::first_difference(std::vector<uint8_t>(after.begin(), after.begin() + kCluster),
                               std::vector<uint8_t>(before.begin(), before.begin() + kCluster)),
        -1);
}

// A bitmap directory we cannot read fully: the bitmaps still go (the autoclear bit made them
// invalid anyway), their clusters stay allocated, and the image works.
TEST_F(MetadataBitmapsTest, AMalformedDirectoryLeavesItsClustersAllocated) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir);
    // Reserved bits in the first bitmap's first table entry.
    const uint64_t table = first_bitmap_table(img);
    test::put_be64_at(img, table, test::be64_at(img, table) | (1ULL << 60));
    write_once(img);
    test::CheckResult c = test::qemu_check(img);
    EXPECT_EQ(c.corruptions, 0U) << c.output;
    EXPECT_GT(c.leaks, 0U) << "freed clusters named by a table it could not read" << c.output;
    EXPECT_FALSE(has_bitmaps_extension(img));
}

// The header write that drops the bitmaps fails: nothing is freed, the bitmaps stay valid for
// QEMU, and the next attempt drops them.
TEST_F(MetadataBitmapsTest, AFailedHeaderWriteFreesNothing) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir);
    Stack s = open_read_only(img);
    FaultNode* fault = s.fault.get();
    Qcow2Node* node = s.node.get();
    FaultRule header_write;
    header_write.ops = fault_op::kWrite;
    header_write.offset = 0;
    header_write.bytes = 8;
    header_write.once = true;
    fault->add_rule(header_write);
    ASSERT_FALSE(run(node->set_writable(true)).ok());
    ASSERT_EQ(fault->fired_total(), 1U);
    const std::string copy = dir.file("copy.qcow2");  // the open node holds the image's lock
    std::filesystem::copy_file(img, copy);
    expect_clean(copy);
    EXPECT_TRUE(has_bitmaps_extension(img));
    EXPECT_EQ(test::be64_at(img, kAutoclearAt), 1U);
    Status again = run(node->set_writable(true));
    ASSERT_TRUE(again.ok()) << again.error().message();
    (void)run(node->close());
    const std::string closed = dir.file("closed.qcow2");
    std::filesystem::copy_file(img, closed);
    expect_clean(closed);
    EXPECT_FALSE(has_bitmaps_extension(img));
}

// Reading the bitmap directory fails (a bad sector, perhaps for good): the image still becomes
// writable, the bitmaps still go, and their clusters stay allocated: a leak, nothing worse.
TEST_F(MetadataBitmapsTest, AFailedReadOfTheBitmapsLeavesTheirClustersAllocated) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = image_with_bitmaps(dir);
    uint64_t directory = 0;
    for (const qcow2::Extension& e : header_of(img).other_extensions) {
        if (e.type == qcow2::kExtBitmaps) {
            directory = qcow2::load_be64(e.data.data() + 16);
        }
    }
    ASSERT_NE(directory, 0U);
    Stack s = open_read_only(img);
    FaultNode* fault = s.fault.get();
    Qcow2Node* node = s.node.get();
    FaultRule directory_read;
    directory_read.ops = fault_op::kRead;
    directory_read.offset = directory;
    directory_read.bytes = 8;
    fault->add_rule(directory_read);  // always
    Status writable = run(node->set_writable(true));
    ASSERT_TRUE(writable.ok()) << writable.error().message();
    EXPECT_GT(fault->fired_total(), 0U);
    fault->clear_rules();
    Status wrote;
    run(write_into(node, 0, &wrote));
    EXPECT_TRUE(wrote.ok());
    (void)run(node->close());
    const std::string closed = dir.file("closed.qcow2");
    std::filesystem::copy_file(img, closed);
    test::CheckResult c = test::qemu_check(closed);
    EXPECT_EQ(c.corruptions, 0U) << c.output;
    EXPECT_GT(c.leaks, 0U) << c.output;
    EXPECT_FALSE(has_bitmaps_extension(img));
}

}  // namespace
}  // namespace imgfs
