// A read maps a guest cluster to a host cluster and then reads it, with nothing held between the
// two: a discard may free that host cluster meanwhile, and a write may be given it. The read must
// then not return the write's data (another guest region's bytes), so a host cluster freed while
// reads are in flight is handed out again only once those reads are done.
#include <algorithm>
#include <cstdio>
#include <fcntl.h>
#include <filesystem>
#include <unistd.h>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "drivers/qcow2/format.h"
#include "qcow2/fault_stack.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

class ReadDiscardTest : public test::FaultStackTest {};

Task<void> read_into(Node* node, uint64_t offset, std::vector<uint8_t>* buf, Status* out) {
    *out = co_await node->read(offset, *buf);
}

Task<void> discard_flush_write(Node* node, Status* out) {
    *out = co_await node->discard(0, 4096);
    if (*out) {
        *out = co_await node->flush();
    }
    if (*out) {
        std::vector<uint8_t> other(4096, 0xbb);
        *out = co_await node->write(1 << 20, other);  // given the first free cluster
    }
}

// Discards guest cluster 0 (`bytes` long), makes that durable, and writes `run` bytes of 0xbb
// at 512 KiB: enough clusters that the allocator reaches the freed one.
Task<void> discard_flush_write_run(Node* node, uint64_t bytes, uint64_t run, Status* out) {
    *out = co_await node->discard(0, bytes);
    if (*out) {
        *out = co_await node->flush();
    }
    if (*out) {
        std::vector<uint8_t> other(run, 0xbb);
        *out = co_await node->write(512 << 10, other);
    }
}

Task<void> join(TaskScope* s) {
    co_await s->join();
}

TEST_F(ReadDiscardTest, AReadNeverSeesTheDataOfTheClustersNextOwner) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string pristine = dir.file("pristine.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 '" + pristine + "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0xaa 0 4k' '" + pristine + "' >/dev/null");
    int foreign = 0;
    int discarded_first = 0;
    const int seeds = 60;
    for (int seed = 1; seed <= seeds; ++seed) {
        const std::string img = dir.file("img.qcow2");
        Stack s = open_copy(pristine, img, static_cast<uint64_t>(seed), 8);
        if (seed % 2 == 0) {
            // The read, mapped already, reaches the file only after the rest is done.
            FaultRule slow;
            slow.ops = fault_op::kRead;
            slow.offset = 0;
            slow.bytes = 1 << 20;  // not the header: only data of guest cluster 0 lies there
            slow.action = FaultAction::kDelay;
            slow.delay_ms = 30;
            s.fault->add_rule(slow);
        }
        std::vector<uint8_t> buf(4096);
        Status read;
        Status edited;
        {
            TaskScope scope(loop_.get());
            scope.spawn(read_into(s.node.get(), 0, &buf, &read));
            scope.spawn(discard_flush_write(s.node.get(), &edited));
            run(join(&scope));
        }
        ASSERT_TRUE(read.ok()) << read.error().message();
        ASSERT_TRUE(edited.ok()) << edited.error().message();
        // Before the discard: the old bytes; after it: zeros. Never the write's 0xbb.
        foreign += buf[0] == 0xbb ? 1 : 0;
        discarded_first += buf[0] == 0 ? 1 : 0;
        EXPECT_TRUE(buf[0] == 0xaa || buf[0] == 0 || buf[0] == 0xbb) << int{buf[0]};
        (void)run(s.node->close());
        users_.clear();
        s = Stack{};
    }
    EXPECT_EQ(foreign, 0) << foreign << " of " << seeds << " reads returned another region's data";
    std::printf("read/discard race: %d of %d reads saw zeros, %d the next owner's data\n",
                discarded_first, seeds, foreign);
}

void put_bytes_at(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_EQ(::pwrite(fd.get(), bytes.data(), bytes.size(), static_cast<off_t>(offset)),
              static_cast<ssize_t>(bytes.size()));
}

void put_be16_at(const std::string& path, uint64_t offset, uint16_t value) {
    put_bytes_at(path, offset, {static_cast<uint8_t>(value >> 8), static_cast<uint8_t>(value)});
}

// map() itself can suspend after it has read the L2 entry: for data past the end of the file
// (legitimate after a crash: the entry and refcount reached the disk, the data did not) it reads
// the clusters' refcounts, and that refcount block may not be cached. A discard, flush and
// allocating write meanwhile gave the run's first cluster to another region; the read, which
// took its ticket only after map() returned, then read that region's data (fails so without
// 692b4ce's fix).
//
// The image, 512-byte clusters (a refcount block covers 256 clusters): guest clusters 0 and 1 at
// host clusters 255 and 256, on both sides of a refcount block boundary, and the file cut at 256,
// so that only the second lies past its end.
TEST_F(ReadDiscardTest, AReadHoldsItsClustersWhileItMapsThem) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=512 '" + img + "' 1M");
    // The L2 tables of [512k, 704k) exist already, so that the write there (see
    // discard_flush_write_run) allocates data clusters only.
    std::string writes = "-c 'write -P 0xaa 0 1k' -c 'write -P 0x11 64k 16k'";
    for (int k = 0; k < 6; ++k) {
        writes += " -c 'write -P 0x22 " + std::to_string(512 + 32 * k) + "k 512'";
    }
    test::must("qemu-io -f qcow2 " + writes + " '" + img + "' >/dev/null");
    constexpr uint64_t kCs = 512;
    constexpr uint64_t kFirst = 255;   // guest cluster 0, the last of refcount block 0's range
    constexpr uint64_t kSecond = 256;  // guest cluster 1, the first of block 1's range
    constexpr uint64_t kBlock1 = 254;  // where refcount block 1 goes
    ASSERT_LT(std::filesystem::file_size(img), kBlock1 * kCs) << "the image grew past the plan";
    const uint64_t reftable = test::be64_at(img, 48);
    const uint64_t block0 = test::be64_at(img, reftable);
    ASSERT_EQ(test::be64_at(img, reftable + 8), 0U);
    const uint64_t l2 = test::be64_at(img, test::be64_at(img, 40)) & qcow2::kOffsetMask;
    const uint64_t copied = uint64_t{1} << 63;
    // Guest clusters 2 and 3 take over the clusters qemu gave 0 and 1 (so that nothing below
    // 254 is left referenced by nobody); 0 and 1 move to 255 and 256.
    test::put_be64_at(img, l2 + 16, test::be64_at(img, l2));
    test::put_be64_at(img, l2 + 24, test::be64_at(img, l2 + 8));
    test::put_be64_at(img, l2, (kFirst * kCs) | copied);
    test::put_be64_at(img, l2 + 8, (kSecond * kCs) | copied);
    std::filesystem::resize_file(img, kSecond * kCs);  // 256 lies past the end
    put_bytes_at(img, kFirst * kCs, std::vector<uint8_t>(kCs, 0xaa));
    test::put_be64_at(img, reftable + 8, kBlock1 * kCs);
    put_be16_at(img, block0 + 2 * kBlock1, 1);
    put_be16_at(img, block0 + 2 * kFirst, 1);
    put_be16_at(img, kBlock1 * kCs + 2 * (kSecond - 256), 1);

    Stack s = open(img);
    ASSERT_NE(s.node, nullptr);
    ASSERT_TRUE(s.node->metadata()->drop_refblock_cache());
    FaultRule block_read;  // map() waits for refcount block 1 while the others go on
    block_read.ops = fault_op::kRead;
    block_read.offset = kBlock1 * kCs;
    block_read.bytes = kCs;
    block_read.action = FaultAction::kDelay;
    block_read.delay_ms = 30;
    s.fault->add_rule(block_read);
    FaultRule data_read = block_read;  // and reads cluster 255 after they are done
    data_read.offset = kFirst * kCs;
    data_read.delay_ms = 60;
    s.fault->add_rule(data_read);

    std::vector<uint8_t> buf(2 * kCs, 0x55);
    Status read;
    Status edited;
    {
        TaskScope scope(loop_.get());
        scope.spawn(read_into(s.node.get(), 0, &buf, &read));
        scope.spawn(discard_flush_write_run(s.node.get(), kCs, 192 << 10, &edited));
        run(join(&scope));
    }
    ASSERT_TRUE(read.ok()) << read.error().message();
    ASSERT_TRUE(edited.ok()) << edited.error().message();
    // Cluster 255: its bytes before the discard (0xaa) or after it (zeros, punched); 256 lies
    // past the end of the file. Never what was written into the cluster's next owner.
    const auto first = std::vector<uint8_t>(buf.begin(), buf.begin() + kCs);
    const bool first_ok =
        first == std::vector<uint8_t>(kCs, 0xaa) || first == std::vector<uint8_t>(kCs, 0);
    EXPECT_TRUE(first_ok) << "the read returned bytes of the cluster's next owner (first byte "
                          << int{buf[0]} << ")";
    EXPECT_TRUE(std::all_of(buf.begin() + kCs, buf.end(), [](uint8_t b) { return b == 0; }));
    (void)run(s.node->close());
}

// A discard over several clusters whose second L2 entry is damaged: the first entry was already
// changed in the cached table when the damage was found, and the table was not marked dirty,
// so reads showed the discard the disk never got. Nothing changes now.
TEST_F(ReadDiscardTest, ADiscardThatMeetsADamagedEntryChangesNothing) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 '" + img + "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 8k' '" + img + "' >/dev/null");
    const uint64_t l2 = test::be64_at(img, test::be64_at(img, 40)) & qcow2::kOffsetMask;
    test::put_be64_at(img, l2 + 8, test::be64_at(img, l2 + 8) | 0x100);  // reserved bits
    Stack s = open(img);
    EXPECT_FALSE(run(s.node->discard(0, 8192)).ok());
    std::vector<uint8_t> buf(4096);
    ASSERT_TRUE(run(s.node->read(0, buf)).ok());
    EXPECT_EQ(buf[0], 0x11) << "the discard changed the cached table before failing";
    (void)run(s.node->close());
}

}  // namespace
}  // namespace imgfs
