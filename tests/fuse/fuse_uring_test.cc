#include "fuse/fuse_uring.h"

#include <gtest/gtest.h>

namespace imgfs::fuse_uring {
namespace {

RingState accepted_ring() {
    RingState ring;
    ring.accepted = true;
    ring.in_use = true;
    ring.queues = 2;
    ring.entries_per_queue = 64;
    return ring;
}

TEST(FuseUring, ParsesTheModeOption) {
    EXPECT_EQ(*parse_mode("on"), Mode::kOn);
    EXPECT_EQ(*parse_mode("off"), Mode::kOff);
    EXPECT_EQ(*parse_mode("auto"), Mode::kAuto);
    Result<Mode> bad = parse_mode("yes");
    ASSERT_FALSE(bad);
    EXPECT_EQ(bad.error().errnum, EINVAL);
}

TEST(FuseUring, StatusNamesDevFuseUnlessTheKernelTookTheRing) {
    EXPECT_EQ(describe(RingState{}), "/dev/fuse");
    EXPECT_EQ(describe(accepted_ring()), "io_uring (2 queues x 64 entries, 1 loop)");
    RingState two_loops = accepted_ring();
    two_loops.loops = 2;
    EXPECT_EQ(describe(two_loops), "io_uring (2 queues x 64 entries, 2 loops)");
}

TEST(FuseUring, StatusSaysHowManyEntriesTheKernelRefused) {
    RingState ring = accepted_ring();
    ring.failed_entries = 3;
    ring.register_error = EINVAL;
    ring.in_use = true;  // every queue had an entry before the refusals
    EXPECT_EQ(describe(ring),
              "io_uring (2 queues x 64 entries, 1 loop, 3 entries refused: Invalid argument)");
}

TEST(FuseUring, ARefusedEntryKeepsTheConnectionOnDevFuse) {
    // One refused registration stops the kernel taking more; unless every queue had an entry
    // by then, it never switches to the ring.
    RingState ring = accepted_ring();
    ring.in_use = false;
    ring.failed_entries = 64;
    ring.register_error = EINVAL;
    EXPECT_EQ(describe(ring),
              "/dev/fuse (FUSE-over-io_uring unused: the kernel refused 64 ring entries: "
              "Invalid argument)");
    ring.failed_entries = 1;
    EXPECT_EQ(describe(ring),
              "/dev/fuse (FUSE-over-io_uring unused: the kernel refused 1 ring entry: "
              "Invalid argument)");
    ring.in_use = true;
    EXPECT_EQ(describe(ring),
              "io_uring (2 queues x 64 entries, 1 loop, 1 entries refused: Invalid argument)");
}

TEST(FuseUring, CountsTheCpusOfAList) {
    // The kernel keeps one queue per possible CPU and numbers them from 0: a gap in the list
    // does not add a queue.
    EXPECT_EQ(*count_cpus("0"), 1u);
    EXPECT_EQ(*count_cpus("0-1"), 2u);
    EXPECT_EQ(*count_cpus("0-3"), 4u);
    EXPECT_EQ(*count_cpus("0,2-5"), 5u);
    EXPECT_EQ(*count_cpus("0-1,4,6-7"), 5u);
    for (const char* bad : {"", "-", "1-0", "a", "0,", ",0", "0-", "0--1", "5000", "+1"}) {
        Result<uint32_t> r = count_cpus(bad);
        EXPECT_FALSE(r) << bad;
        if (!r) {
            EXPECT_EQ(r.error().errnum, EINVAL) << bad;
        }
    }
    Result<uint32_t> here = possible_cpus();
    ASSERT_TRUE(here) << here.error().message();
    EXPECT_GE(*here, 1u);
}

}  // namespace
}  // namespace imgfs::fuse_uring
