// PayloadPool: layout of the buffers, and the resident budget (least recently used huge pages
// that no buffer in use overlaps go first; pages in use are never given back).
#include "fuse/payload_pool.h"

#include <cstring>

#include <gtest/gtest.h>

namespace imgfs {
namespace {

constexpr size_t kMiB = 1 << 20;
constexpr size_t kHuge = PayloadPool::kHugePageBytes;

TEST(PayloadPool, BuffersArePageAlignedAndDisjoint) {
    PayloadPool pool(kMiB, 8, 64 * kMiB);
    ASSERT_TRUE(pool.ok());
    EXPECT_EQ(pool.capacity(), 8U);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.buffer(0).data()) % kHuge, 0U);
    for (uint32_t i = 0; i + 1 < 8; ++i) {
        EXPECT_EQ(pool.buffer(i).size(), kMiB);
        EXPECT_EQ(pool.buffer(i).data() + kMiB, pool.buffer(i + 1).data());
    }
    EXPECT_EQ(pool.resident_bytes(), 0U);  // address space only until something is written
}

TEST(PayloadPool, OddBufferSizesStraddleHugePages) {
    PayloadPool pool(3 * kMiB, 4, 64 * kMiB);  // buffer 1 covers huge pages 1 and 2
    ASSERT_TRUE(pool.ok());
    pool.acquire(1);
    std::memset(pool.buffer(1).data(), 1, 3 * kMiB);
    pool.release(1, 3 * kMiB);
    EXPECT_EQ(pool.resident_bytes(), 2 * kHuge);
    pool.acquire(0);
    pool.release(0, 4096);  // only the first huge page
    EXPECT_EQ(pool.resident_bytes(), 3 * kHuge);
}

TEST(PayloadPool, StaysWithinTheBudgetDroppingTheLeastRecentlyUsed) {
    PayloadPool pool(kMiB, 16, 4 * kMiB);
    ASSERT_TRUE(pool.ok());
    for (uint32_t i = 0; i < 16; ++i) {
        pool.acquire(i);
        std::memset(pool.buffer(i).data(), static_cast<int>(i + 1), kMiB);
    }
    // Release in order: each release of a whole huge page pushes the oldest idle one out.
    const auto t0 = PayloadPool::Clock::now();
    for (uint32_t i = 0; i < 16; ++i) {
        pool.release(i, kMiB, t0 + std::chrono::milliseconds(i));
        EXPECT_LE(pool.resident_bytes(), 4 * kMiB) << i;
    }
    // The two most recent huge pages (buffers 12-15) kept their bytes; the first were dropped
    // (anonymous memory given back reads as zeros).
    EXPECT_EQ(pool.buffer(15)[100], 16);
    EXPECT_EQ(pool.buffer(12)[100], 13);
    EXPECT_EQ(pool.buffer(0)[100], 0);
}

TEST(PayloadPool, PagesInUseAreNeverGivenBack) {
    PayloadPool pool(kMiB, 8, 2 * kMiB);
    ASSERT_TRUE(pool.ok());
    for (uint32_t i = 0; i < 8; ++i) {
        pool.acquire(i);
        std::memset(pool.buffer(i).data(), 0x5a, kMiB);
    }
    // Buffer 0 stays in use: its huge page is shared with buffer 1, which is released too.
    for (uint32_t i = 1; i < 8; ++i) {
        pool.release(i, kMiB);
    }
    EXPECT_EQ(pool.buffer(0)[0], 0x5a);
    EXPECT_EQ(pool.buffer(0)[kMiB - 1], 0x5a);
    EXPECT_EQ(pool.buffer(1)[0], 0x5a);  // shares the page in use
    pool.release(0, kMiB);
    EXPECT_LE(pool.resident_bytes(), 2 * kMiB);
}

TEST(PayloadPool, IdlePagesGoBackAfterTheIdlePeriodOnly) {
    PayloadPool pool(kMiB, 8, 64 * kMiB, std::chrono::milliseconds(1000));
    ASSERT_TRUE(pool.ok());
    const auto t0 = PayloadPool::Clock::now();
    for (uint32_t i = 0; i < 4; ++i) {
        pool.acquire(i);
        std::memset(pool.buffer(i).data(), 7, kMiB);
        pool.release(i, kMiB, t0);
    }
    EXPECT_EQ(pool.resident_bytes(), 2 * kHuge);  // under budget, not idle long: kept
    pool.acquire(2);                              // page 1 in use again
    pool.acquire(4);
    pool.release(4, 4096, t0 + std::chrono::milliseconds(500));
    EXPECT_EQ(pool.resident_bytes(), 3 * kHuge);
    pool.acquire(5);
    pool.release(5, 0, t0 + std::chrono::milliseconds(1200));
    // Page 0 idle for 1.2 s: back; page 1 in use: kept; page 2 idle 0.7 s: kept.
    EXPECT_EQ(pool.resident_bytes(), 2 * kHuge);
    EXPECT_EQ(pool.buffer(0)[0], 0);
    EXPECT_EQ(pool.buffer(2)[0], 7);
    pool.release(2, kMiB, t0 + std::chrono::milliseconds(1300));
}

TEST(PayloadPool, UntouchedReleasesCostNothing) {
    PayloadPool pool(kMiB, 4, kMiB);
    ASSERT_TRUE(pool.ok());
    pool.acquire(0);
    pool.release(0, 0);
    EXPECT_EQ(pool.resident_bytes(), 0U);
}

}  // namespace
}  // namespace imgfs
