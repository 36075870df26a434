// RingArena: each ring entry's buffer is a small-page head ending on a huge-page boundary and a
// tail on a huge page of its own, so that a small request never makes a huge page resident.
#include "fuse/ring_arena.h"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace imgfs {
namespace {

constexpr size_t kKiB = 1024;
constexpr size_t kMiB = 1024 * kKiB;
constexpr size_t kHuge = RingArena::kHugePageBytes;

struct Area {
    uintptr_t lo = 0;
    uintptr_t hi = 0;
    long rss_kib = 0;
    long anon_huge_kib = 0;
    int thp_eligible = -1;
};

// The mappings of this process, from /proc/self/smaps.
std::vector<Area> areas() {
    std::ifstream smaps("/proc/self/smaps");
    std::vector<Area> out;
    std::string line;
    while (std::getline(smaps, line)) {
        uintptr_t lo = 0;
        uintptr_t hi = 0;
        char dash = 0;
        std::istringstream head(line);
        if (line.find('-') != std::string::npos && line.find(':') > line.find(' ') &&
            (head >> std::hex >> lo >> dash >> hi) && dash == '-') {
            out.push_back(Area{lo, hi});
        } else if (!out.empty() && line.rfind("Rss:", 0) == 0) {
            out.back().rss_kib = std::stol(line.substr(4));
        } else if (!out.empty() && line.rfind("AnonHugePages:", 0) == 0) {
            out.back().anon_huge_kib = std::stol(line.substr(14));
        } else if (!out.empty() && line.rfind("THPeligible:", 0) == 0) {
            out.back().thp_eligible = std::stoi(line.substr(12));
        }
    }
    return out;
}

// The mapping that holds `p`.
Area area_of(const void* p) {
    const auto addr = reinterpret_cast<uintptr_t>(p);
    for (const Area& a : areas()) {
        if (addr >= a.lo && addr < a.hi) {
            return a;
        }
    }
    return Area{};
}

std::string thp_setting(const char* name) {
    std::ifstream f(std::string("/sys/kernel/mm/transparent_hugepage/") + name);
    std::string modes;
    std::getline(f, modes);
    return modes;
}

// The kernel has transparent huge pages (then madvise splits areas by their advice).
bool thp_built_in() {
    return !thp_setting("enabled").empty();
}

bool thp_offered() {
    std::string modes = thp_setting("enabled");
    return !modes.empty() && modes.find("[never]") == std::string::npos;
}

// A fault in an area advised MADV_HUGEPAGE compacts memory to find a huge page if it must.
bool thp_compacts_on_fault() {
    std::string modes = thp_setting("defrag");
    return modes.find("[always]") != std::string::npos ||
           modes.find("[madvise]") != std::string::npos ||
           modes.find("[defer+madvise]") != std::string::npos;
}

// Skips the rest of a test on a host without huge pages, except in CI, whose hosts have them.
#define REQUIRE_THP(available)                                                              \
    do {                                                                                    \
        if (!(available)) {                                                                 \
            ASSERT_EQ(std::getenv("CI"), nullptr) << "transparent huge pages are off here"; \
            GTEST_SKIP() << "transparent huge pages are off on this host";                  \
        }                                                                                   \
    } while (0)

TEST(RingArena, EachHeadEndsOnAHugePageBoundary) {
    RingArena arena(kMiB, 128 * kKiB, 8, 8);
    ASSERT_TRUE(arena.ok());
    EXPECT_EQ(arena.capacity(), 8U);
    for (uint32_t i = 0; i < 8; ++i) {
        MutBuf b = arena.buffer(i);
        EXPECT_EQ(b.size(), kMiB);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % 4096, 0U);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data() + 128 * kKiB) % kHuge, 0U) << i;
        if (i > 0) {
            EXPECT_GE(b.data(), arena.buffer(i - 1).data() + kMiB);  // disjoint
        }
    }
}

TEST(RingArena, SmallRequestsStayOnSmallPages) {
    REQUIRE_THP(thp_built_in());  // without, the advice fails and nothing is split
    RingArena arena(kMiB, 128 * kKiB, 8, 8);
    ASSERT_TRUE(arena.ok());
    for (uint32_t i = 0; i < 8; ++i) {
        std::memset(arena.buffer(i).data(), 0x5a, 64 * kKiB);
    }
    for (uint32_t i = 0; i < 8; ++i) {
        // Each head has a mapping of its own (the tails between them are advised otherwise).
        Area head = area_of(arena.buffer(i).data());
        EXPECT_EQ(head.thp_eligible, 0) << i;
        EXPECT_EQ(head.rss_kib, 64) << i;
        EXPECT_EQ(head.anon_huge_kib, 0) << i;
        EXPECT_EQ(area_of(arena.buffer(i).data() + 128 * kKiB).rss_kib, 0) << i;
    }
}

TEST(RingArena, ALargeRequestSpillsIntoOneHugePage) {
    REQUIRE_THP(thp_offered());
    RingArena arena(kMiB, 128 * kKiB, 4, 4);
    ASSERT_TRUE(arena.ok());
    std::memset(arena.buffer(1).data(), 0x5a, kMiB);
    Area tail = area_of(arena.buffer(1).data() + 128 * kKiB);
    EXPECT_EQ(tail.hi - tail.lo, kHuge);  // the tail's own mapping, one huge page
    EXPECT_EQ(tail.thp_eligible, 1);
    if (thp_compacts_on_fault()) {
        // The kernel makes room for a huge page on this fault rather than fall back.
        EXPECT_EQ(tail.anon_huge_kib, 2048);
    }
    EXPECT_EQ(area_of(arena.buffer(1).data()).anon_huge_kib, 0);  // the head stays small
}

TEST(RingArena, PlainBuffersArePackedAndTailsThatDoNotFitAreDropped) {
    RingArena arena(kMiB, 128 * kKiB, 8, 2);
    ASSERT_TRUE(arena.ok());
    EXPECT_EQ(arena.huge_tails(), 2U);
    for (uint32_t i = 0; i + 1 < 6; ++i) {
        EXPECT_EQ(arena.buffer(i).data() + kMiB, arena.buffer(i + 1).data()) << i;
    }
    EXPECT_GE(arena.buffer(6).data(), arena.buffer(5).data() + kMiB);
    EXPECT_GE(arena.buffer(7).data(), arena.buffer(6).data() + kMiB);

    RingArena more_tails_than_buffers(kMiB, 128 * kKiB, 2, 5);
    ASSERT_TRUE(more_tails_than_buffers.ok());
    EXPECT_EQ(more_tails_than_buffers.huge_tails(), 2U);

    // 3 MiB buffers: 3 MiB - 128 KiB does not fit one huge page, so none gets a tail, and
    // every byte of every buffer can be written.
    RingArena large(3 * kMiB, 128 * kKiB, 4, 4);
    ASSERT_TRUE(large.ok());
    EXPECT_EQ(large.huge_tails(), 0U);
    for (uint32_t i = 0; i < 4; ++i) {
        EXPECT_EQ(large.buffer(i).size(), 3 * kMiB);
        std::memset(large.buffer(i).data(), static_cast<int>(i + 1), 3 * kMiB);
    }
    for (uint32_t i = 0; i < 4; ++i) {
        EXPECT_EQ(large.buffer(i)[0], i + 1);
        EXPECT_EQ(large.buffer(i)[3 * kMiB - 1], i + 1);
    }
}

TEST(RingArena, OnlyTheLastBuffersGetHugeTails) {
    // The kernel hands out the entries registered last first; the others stay on small pages,
    // so what huge pages add to the daemon's memory is bounded by the last few.
    REQUIRE_THP(thp_offered());
    RingArena arena(kMiB, 128 * kKiB, 8, 2);
    ASSERT_TRUE(arena.ok());
    for (uint32_t i = 0; i < 8; ++i) {
        EXPECT_EQ(area_of(arena.buffer(i).data()).thp_eligible, 0) << i;
        EXPECT_EQ(area_of(arena.buffer(i).data() + 128 * kKiB).thp_eligible, i >= 6 ? 1 : 0) << i;
    }
    std::memset(arena.buffer(0).data(), 1, kMiB);
    EXPECT_EQ(area_of(arena.buffer(0).data()).anon_huge_kib, 0);
}

}  // namespace
}  // namespace imgfs
