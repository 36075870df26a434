// L2 table allocation and copy-on-write (metadata_tables.cc) on real images: a table whose
// cluster was freed must never come back out of the cache when that cluster is reused.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "drivers/qcow2/format.h"
#include "qcow2/fault_stack.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

class MetadataTablesTest : public test::FaultStackTest {};

// An L1 entry without the COPIED flag whose table has refcount 1 (an image a tool left with a
// stale flag): the first write copies the table and frees the old one. The next new table is
// allocated in that freed cluster; it must start empty, not as the freed table's cached
// contents, or it would map a fresh guest range onto the first range's data clusters, and a
// write there would overwrite them.
TEST_F(MetadataTablesTest, ANewTableInAFreedTablesClusterStartsEmpty) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    // 4 KiB clusters: one L2 table maps 2 MiB.
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 '" + img + "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 64k' '" + img + "' >/dev/null");
    const uint64_t l1 = test::be64_at(img, 40);
    const uint64_t entry = test::be64_at(img, l1);
    ASSERT_NE(entry & qcow2::kOflagCopied, 0U);
    test::put_be64_at(img, l1, entry & ~qcow2::kOflagCopied);

    {
        Stack s = open(img);
        // Zeroes over data: a new entry in the table, which is copied first, and no new data
        // cluster, so the next allocation is the next table.
        ASSERT_TRUE(run(s.node->write_zeroes(8192, 4096, false)).ok());
        std::vector<uint8_t> b(4096, 0x33);
        ASSERT_TRUE(run(s.node->write(4 << 20, b)).ok());  // a new table for 4-6 MiB
        std::vector<uint8_t> got(4096);
        ASSERT_TRUE(run(s.node->read(0, got)).ok());
        EXPECT_EQ(got[0], 0x11) << "the first range's data was overwritten";
        ASSERT_TRUE(run(s.node->read((4 << 20) + 4096, got)).ok());
        EXPECT_EQ(got[0], 0) << "the new range maps the old table's data";
        ASSERT_TRUE(run(s.node->close()).ok());
        users_.clear();
    }
    test::CheckResult chk = test::qemu_check(img);
    EXPECT_EQ(chk.corruptions, 0U) << chk.output;
    EXPECT_EQ(chk.check_errors, 0U) << chk.output;
    std::vector<uint8_t> raw = test::qemu_convert_raw(img);
    ASSERT_EQ(raw.size(), 8U << 20);
    EXPECT_EQ(raw[0], 0x11);
    EXPECT_EQ(raw[8192], 0);
    EXPECT_EQ(raw[12288], 0x11);
    EXPECT_EQ(raw[4 << 20], 0x33);
    EXPECT_EQ(raw[(4 << 20) + 4096], 0);
    EXPECT_EQ(raw[6 << 20], 0);
}

// A malformed image whose L1 entry points at a refcount block (or at another structure, or at
// another entry's table with COPIED on both): the L2 and refcount caches would both write that
// cluster, and refcounts and mappings would overwrite each other. Using such a table is refused
// with EIO, naming what it lies on; the rest of the image still serves.
TEST_F(MetadataTablesTest, AnL2TableOnAnotherStructureIsRefused) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 '" + img + "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 4k' -c 'write -P 0x22 4M 4k' '" + img +
               "' >/dev/null");
    const uint64_t l1 = test::be64_at(img, 40);
    const uint64_t refblock = test::be64_at(img, test::be64_at(img, 48));  // refcount table[0]
    ASSERT_NE(refblock, 0U);
    test::put_be64_at(img, l1, refblock | qcow2::kOflagCopied);  // guest 0-2 MiB's table
    Stack s = open(img);
    std::vector<uint8_t> buf(4096, 0x33);
    Status wrote = run(s.node->write(100 * 4096, buf));
    ASSERT_FALSE(wrote.ok()) << "a write went through a refcount block used as an L2 table";
    EXPECT_EQ(wrote.error().errnum, EIO);
    EXPECT_NE(wrote.error().message().find("lies on a refcount block"), std::string::npos)
        << wrote.error().message();
    Status read = run(s.node->read(4 << 20, buf));  // another table: still served
    ASSERT_TRUE(read.ok()) << read.error().message();
    EXPECT_EQ(buf[0], 0x22);
    (void)run(s.node->close());
}

}  // namespace
}  // namespace imgfs
