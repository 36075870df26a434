// ClusterSet: runs merge, split and answer lookups as a plain set of clusters would.
#include "drivers/qcow2/cluster_set.h"

#include <random>
#include <set>

#include <gtest/gtest.h>

namespace imgfs::qcow2 {
namespace {

TEST(ClusterSetTest, OverlappingAndAdjacentRunsMerge) {
    ClusterSet s;
    s.insert(10, 5);  // 10..14
    s.insert(20, 5);  // 20..24
    EXPECT_EQ(s.runs(), 2U);
    s.insert(15, 5);  // fills the gap exactly: one run 10..24
    EXPECT_EQ(s.runs(), 1U);
    EXPECT_TRUE(s.contains(10));
    EXPECT_TRUE(s.contains(24));
    EXPECT_FALSE(s.contains(9));
    EXPECT_FALSE(s.contains(25));
    s.insert(0, 100);  // swallows it
    EXPECT_EQ(s.runs(), 1U);
    EXPECT_TRUE(s.contains(99));
    EXPECT_FALSE(s.contains(100));
}

TEST(ClusterSetTest, TheSameLargeRunManyTimesStaysOneRun) {
    // As 65,536 snapshots naming one 32 MiB L1 table of 512-byte clusters.
    ClusterSet s;
    for (int i = 0; i < 65536; ++i) {
        s.insert(1024, 65536);
    }
    EXPECT_EQ(s.runs(), 1U);
    EXPECT_TRUE(s.contains(1024 + 65535));
}

TEST(ClusterSetTest, EraseSplitsARun) {
    ClusterSet s;
    s.insert(0, 10);
    EXPECT_TRUE(s.erase(5));
    EXPECT_FALSE(s.erase(5));
    EXPECT_EQ(s.runs(), 2U);
    EXPECT_TRUE(s.contains(4));
    EXPECT_FALSE(s.contains(5));
    EXPECT_TRUE(s.contains(6));
    EXPECT_TRUE(s.erase(0));
    EXPECT_TRUE(s.erase(9));
    EXPECT_FALSE(s.erase(10));
    EXPECT_FALSE(s.contains(0));
    EXPECT_TRUE(s.contains(1));
    EXPECT_TRUE(s.contains(8));
}

TEST(ClusterSetTest, FirstInFindsTheLowestMemberOfARange) {
    ClusterSet s;
    s.insert(100, 10);
    EXPECT_FALSE(s.first_in(0, 100).has_value());
    EXPECT_EQ(s.first_in(0, 101), std::optional<uint64_t>(100));
    EXPECT_EQ(s.first_in(105, 1), std::optional<uint64_t>(105));
    EXPECT_FALSE(s.first_in(110, 50).has_value());
    EXPECT_FALSE(s.first_in(100, 0).has_value());
}

TEST(ClusterSetTest, AgreesWithAPlainSetUnderRandomChanges) {
    std::mt19937_64 rng(7);
    ClusterSet s;
    std::set<uint64_t> plain;
    for (int step = 0; step < 20000; ++step) {
        const uint64_t c = rng() % 512;
        if (rng() % 3 == 0) {
            EXPECT_EQ(s.erase(c), plain.erase(c) != 0);
        } else {
            const uint64_t n = 1 + rng() % 8;
            s.insert(c, n);
            for (uint64_t i = 0; i < n; ++i) {
                plain.insert(c + i);
            }
        }
        const uint64_t q = rng() % 520;
        const uint64_t n = 1 + rng() % 16;
        auto it = plain.lower_bound(q);
        std::optional<uint64_t> want;
        if (it != plain.end() && *it < q + n) {
            want = *it;
        }
        ASSERT_EQ(s.first_in(q, n), want) << "step " << step;
        ASSERT_EQ(s.contains(q), plain.count(q) != 0) << "step " << step;
    }
}

}  // namespace
}  // namespace imgfs::qcow2
