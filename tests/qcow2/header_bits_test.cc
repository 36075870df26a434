// The header's incompatible feature bits (metadata.cc): the dirty bit of lazy refcounts and the
// corrupt bit are read, changed and written back by different coroutines, one of them (a
// corruption found by a read) without the metadata lock. Neither may undo the other's change,
// on disk or in memory: a lost corrupt bit lets the next opener write a damaged image.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/file.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2_node.h"
#include "qcow2/fault_stack.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

Task<void> write_into(Node* node, uint64_t offset, Status* out) {
    std::vector<uint8_t> b(4096, 0x5a);
    *out = co_await node->write(offset, b);
}

Task<void> read_into(Node* node, uint64_t offset, Status* out) {
    std::vector<uint8_t> b(4096);
    *out = co_await node->read(offset, b);
}

Task<void> join(TaskScope* s) {
    co_await s->join();
}

class HeaderBitsTest : public test::FaultStackTest {};

constexpr uint64_t kIncompatibleAt = 72;
constexpr uint64_t kCorruptBit = 2;

// A write that sets the dirty bit (the first refcount change of a lazy-refcounts image) and a
// read that finds a damaged L2 entry and sets the corrupt bit, at the same time. The fault
// filter holds each request for a random number of turns, so over the seeds the two header
// writes overlap in both orders. The corrupt bit must be on disk after the close.
TEST_F(HeaderBitsTest, TheCorruptBitSurvivesARacingDirtyBit) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string pristine = dir.file("pristine.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on '" + pristine +
               "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 4k' '" + pristine + "' >/dev/null");
    // Reserved bits in the entry of guest cluster 0: reading it is a corruption finding.
    const uint64_t l2 = test::be64_at(pristine, test::be64_at(pristine, 40)) & qcow2::kOffsetMask;
    test::put_be64_at(pristine, l2, test::be64_at(pristine, l2) | 0x100);

    int lost = 0;
    const int seeds = 40;
    for (int seed = 1; seed <= seeds; ++seed) {
        const std::string img = dir.file("img.qcow2");
        Stack s = open_copy(pristine, img, static_cast<uint64_t>(seed), 4);
        Status wrote;
        Status read;
        {
            TaskScope scope(loop_.get());
            scope.spawn(write_into(s.node.get(), 1 << 20, &wrote));  // allocates: dirty bit
            scope.spawn(read_into(s.node.get(), 0, &read));          // finds the damage
            run(join(&scope));
        }
        EXPECT_FALSE(read.ok());
        (void)run(s.node->close());
        users_.clear();
        s = Stack{};
        if ((test::be64_at(img, kIncompatibleAt) & kCorruptBit) == 0) {
            ++lost;
        }
    }
    EXPECT_EQ(lost, 0) << "the corrupt bit was lost with " << lost << " of " << seeds << " seeds";
}

constexpr uint64_t kAutoclearAt = 88;
constexpr uint64_t kDirtyBit = 1;

// An image in `dir` with lazy refcounts, 64 KiB of data, the dirty bit set and autoclear bit 0
// ("the bitmaps are valid"). Returns its path.
std::string dirty_image_claiming_valid_bitmaps(const test::TempDir& dir) {
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on '" + img +
               "' 8M");
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 64k' '" + img + "' >/dev/null");
    test::put_be64_at(img, kIncompatibleAt, test::be64_at(img, kIncompatibleAt) | kDirtyBit);
    test::put_be64_at(img, kAutoclearAt, 1);
    return img;
}

// Fails the write that clears the autoclear bits (`once`: the first one only).
FaultRule failing_the_autoclear_write(bool once) {
    FaultRule rule;
    rule.ops = fault_op::kWrite;
    rule.offset = kAutoclearAt;
    rule.bytes = 8;
    rule.once = once;
    return rule;
}

// Either both bits are still set (the next open repairs again) or the bitmaps are no longer
// claimed valid; never clean with bitmaps claimed valid.
void expect_not_clean_with_bitmaps_claimed(const std::string& img) {
    const bool dirty = (test::be64_at(img, kIncompatibleAt) & kDirtyBit) != 0;
    const bool bitmaps_claimed = test::be64_at(img, kAutoclearAt) != 0;
    EXPECT_TRUE(dirty || !bitmaps_claimed) << "clean, with the bitmaps still claimed valid";
}

// Opening a dirty image for writing rebuilds its refcounts, which count nothing of the bitmaps
// (their clusters become free), and then clears the dirty bit; the autoclear bits, which tell
// QEMU the bitmaps are still valid, were cleared only after that. A failure in between left a
// clean image whose valid-looking bitmaps live in free clusters. The autoclear bits go first.
TEST_F(HeaderBitsTest, AutoclearBitsAreClearedBeforeARepairClearsTheDirtyBit) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dirty_image_claiming_valid_bitmaps(dir);
    auto file = FileNode::open(env(), "file", AT_FDCWD, img, {});
    ASSERT_TRUE(file.ok()) << file.error().message();
    Transaction tx(&graph_);
    auto fault = FaultNode::open(env(), "fault", &tx, *file);
    fault->add_rule(failing_the_autoclear_write(false));
    auto node = Qcow2Node::create(env(), "img", &tx, fault, {});
    ASSERT_TRUE(tx.commit().ok());
    Status loaded = run(node->load());
    ASSERT_FALSE(loaded.ok()) << "the autoclear bits were never written";
    EXPECT_EQ(fault->fired_total(), 1U);
    (void)run(node->close());
    expect_not_clean_with_bitmaps_claimed(img);
}

// The same ordering when the image is made writable after a read-only open (a commit into it):
// the autoclear write failed, but memory already said "cleared", so the next attempt skipped
// it, repaired, and left the image clean with its bitmaps claimed valid over free clusters.
TEST_F(HeaderBitsTest, AFailedSwitchToWritableClearsTheAutoclearBitsOnTheNextTry) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dirty_image_claiming_valid_bitmaps(dir);
    Stack s = open_read_only(img);
    FaultNode* fault = s.fault.get();
    Qcow2Node* node = s.node.get();
    fault->add_rule(failing_the_autoclear_write(true));
    ASSERT_FALSE(run(node->set_writable(true)).ok());
    ASSERT_EQ(fault->fired_total(), 1U);
    Status again = run(node->set_writable(true));
    ASSERT_TRUE(again.ok()) << again.error().message();
    Status written;
    run(write_into(node, 0, &written));
    EXPECT_TRUE(written.ok());
    (void)run(node->close());
    expect_not_clean_with_bitmaps_claimed(img);
}

// The repair counted references in memory sized by the file: a dirty image whose file is huge
// (sparse, or damaged) made it allocate terabytes, and the daemon died of std::bad_alloc. It is
// refused with the reason now, and nothing is written.
TEST_F(HeaderBitsTest, ADirtyImageTooLargeToRepairInMemoryIsRefused) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on '" + img +
               "' 8M");
    test::put_be64_at(img, kIncompatibleAt, test::be64_at(img, kIncompatibleAt) | 1);
    ASSERT_EQ(::truncate(img.c_str(), static_cast<off_t>(1ULL << 50)), 0);  // 1 PiB, sparse
    auto file = FileNode::open(env(), "file", AT_FDCWD, img, {});
    ASSERT_TRUE(file.ok()) << file.error().message();
    Transaction tx(&graph_);
    auto node = Qcow2Node::create(env(), "img", &tx, *file, {});
    ASSERT_TRUE(tx.commit().ok());
    Status loaded = run(node->load());
    ASSERT_FALSE(loaded.ok());
    EXPECT_EQ(loaded.error().errnum, EFBIG);
    EXPECT_NE(loaded.error().message().find("too large to repair here"), std::string::npos)
        << loaded.error().message();
    EXPECT_NE(test::be64_at(img, kIncompatibleAt) & 1, 0U);  // still dirty
    (void)run(node->close());
}

}  // namespace
}  // namespace imgfs
