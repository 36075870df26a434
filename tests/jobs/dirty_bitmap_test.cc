// DirtyBitmap: granule rounding, the partial last granule, counting and next_dirty().
#include "jobs/dirty_bitmap.h"

#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace imgfs {
namespace {

constexpr uint64_t kGranule = 64 * 1024;

TEST(DirtyBitmap, SetMarksEveryGranuleTheRangeTouches) {
    DirtyBitmap b(10 * kGranule, kGranule);
    b.set(kGranule - 1, 2);  // straddles granules 0 and 1
    EXPECT_TRUE(b.test(0));
    EXPECT_TRUE(b.test(kGranule));
    EXPECT_FALSE(b.test(2 * kGranule));
    EXPECT_EQ(b.dirty_bytes(), 2 * kGranule);
    b.set(0, kGranule);  // already dirty: not counted twice
    EXPECT_EQ(b.dirty_bytes(), 2 * kGranule);
}

TEST(DirtyBitmap, ClearTakesWholeGranulesTouchedByTheRange) {
    DirtyBitmap b(10 * kGranule, kGranule);
    b.set(0, 10 * kGranule);
    b.clear(kGranule + 1, 1);  // the copier copies whole granules
    EXPECT_FALSE(b.test(kGranule));
    EXPECT_TRUE(b.test(0));
    EXPECT_EQ(b.dirty_bytes(), 9 * kGranule);
    b.clear(0, 0);  // empty range: nothing
    EXPECT_EQ(b.dirty_bytes(), 9 * kGranule);
}

TEST(DirtyBitmap, RangesPastTheEndAreClipped) {
    DirtyBitmap b(3 * kGranule + 100, kGranule);  // a partial last granule
    b.set(3 * kGranule + 50, 1 << 30);
    EXPECT_TRUE(b.test(3 * kGranule));
    EXPECT_EQ(b.next_dirty(0), 3 * kGranule);
    b.set(1ULL << 40, 4096);           // wholly past the end: ignored
    EXPECT_EQ(b.dirty_bytes(), 100U);  // the part of the last granule inside the range
    EXPECT_FALSE(b.test(1ULL << 40));
    b.clear(0, 1ULL << 40);
    EXPECT_EQ(b.dirty_bytes(), 0U);
    EXPECT_FALSE(b.next_dirty(0).has_value());
}

TEST(DirtyBitmap, NextDirtyWalksAcrossWords) {
    DirtyBitmap b(1000 * kGranule, kGranule);
    for (uint64_t g : {0ULL, 63ULL, 64ULL, 130ULL, 999ULL}) {
        b.set(g * kGranule, 1);
    }
    std::vector<uint64_t> seen;
    for (std::optional<uint64_t> at = b.next_dirty(0); at; at = b.next_dirty(*at + kGranule)) {
        seen.push_back(*at / kGranule);
    }
    EXPECT_EQ(seen, (std::vector<uint64_t>{0, 63, 64, 130, 999}));
    EXPECT_EQ(b.next_dirty(131 * kGranule - 1), 130 * kGranule);  // the granule holding it
    EXPECT_EQ(b.next_dirty(131 * kGranule), 999 * kGranule);
}

TEST(DirtyBitmap, MatchesAModelUnderRandomOps) {
    const uint64_t granules = 777;
    DirtyBitmap b(granules * kGranule, kGranule);
    std::vector<bool> model(granules);
    std::mt19937_64 rng(11);
    for (int i = 0; i < 5000; ++i) {
        uint64_t off = rng() % (granules * kGranule);
        uint64_t len = rng() % (8 * kGranule) + 1;
        bool set = rng() % 2 == 0;
        set ? b.set(off, len) : b.clear(off, len);
        uint64_t last = std::min(off + len, granules * kGranule) - 1;
        for (uint64_t g = off / kGranule; g <= last / kGranule; ++g) {
            model[g] = set;
        }
    }
    uint64_t count = 0;
    for (uint64_t g = 0; g < granules; ++g) {
        ASSERT_EQ(b.test(g * kGranule), static_cast<bool>(model[g])) << g;
        count += model[g] ? 1 : 0;
        std::optional<uint64_t> next = b.next_dirty(g * kGranule);
        uint64_t expect = g;
        while (expect < granules && !model[expect]) {
            ++expect;
        }
        ASSERT_EQ(next.has_value(), expect < granules) << g;
        if (next) {
            ASSERT_EQ(*next, expect * kGranule);
        }
    }
    EXPECT_EQ(b.dirty_bytes(), count * kGranule);
}

}  // namespace
}  // namespace imgfs
