// A read maps a guest cluster to a host cluster and then reads it, with nothing held between the
// two: a discard may free that host cluster meanwhile, and a write may be given it. The read must
// then not return the write's data (another guest region's bytes), so a host cluster freed while
// reads are in flight is handed out again only once those reads are done.
#include <cstdio>
#include <filesystem>

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
