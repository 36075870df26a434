#include "fuse/fuse_uring.h"

#include <gtest/gtest.h>

namespace imgfs::fuse_uring {
namespace {

RingState accepted_ring() {
    RingState ring;
    ring.accepted = true;
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
    EXPECT_EQ(describe(ring),
              "io_uring (2 queues x 64 entries, 1 loop, 3 entries refused: Invalid argument)");
}

TEST(FuseUring, AQueueWithoutEntriesKeepsTheConnectionOnDevFuse) {
    // The kernel switches to the ring only once every queue holds an entry.
    RingState ring = accepted_ring();
    ring.failed_entries = 64;
    ring.queues_without_entries = 1;
    ring.register_error = ENOMEM;
    EXPECT_EQ(describe(ring),
              "/dev/fuse (FUSE-over-io_uring unused: the kernel refused every entry of 1 of 2 "
              "queues: Cannot allocate memory)");
}

}  // namespace
}  // namespace imgfs::fuse_uring
