// Parsing persistent bitmaps into the clusters they use (bitmaps.cc), on byte-level fixtures.
// Anything not understood fully is refused: its clusters then stay allocated, where a misread
// offset would have freed live data.
#include "drivers/qcow2/bitmaps.h"

#include <string>

#include <gtest/gtest.h>

namespace imgfs::qcow2 {
namespace {

constexpr uint64_t kCluster = 64 * 1024;
constexpr uint64_t kFileSize = 64 * kCluster;

Geometry geometry() {
    Header h;
    h.cluster_bits = 16;
    return Geometry::from(h);
}

std::vector<uint8_t> extension(uint32_t bitmaps, uint64_t dir_bytes, uint64_t dir_offset,
                               uint32_t reserved = 0) {
    std::vector<uint8_t> d(24);
    store_be32(d.data(), bitmaps);
    store_be32(d.data() + 4, reserved);
    store_be64(d.data() + 8, dir_bytes);
    store_be64(d.data() + 16, dir_offset);
    return d;
}

// One directory entry: fixed part, extra data, name, zero padding to 8.
void add_entry(std::vector<uint8_t>* dir, uint64_t table_offset, uint32_t table_entries,
               const std::string& name, uint32_t extra_bytes = 0) {
    std::vector<uint8_t> e(24);
    store_be64(e.data(), table_offset);
    store_be32(e.data() + 8, table_entries);
    store_be32(e.data() + 12, 2);  // "auto"
    e[16] = 1;                     // dirty tracking
    e[17] = 16;                    // granularity bits
    store_be16(e.data() + 18, static_cast<uint16_t>(name.size()));
    store_be32(e.data() + 20, extra_bytes);
    e.resize(e.size() + extra_bytes, 0xee);
    e.insert(e.end(), name.begin(), name.end());
    e.resize((e.size() + 7) & ~size_t{7}, 0);
    dir->insert(dir->end(), e.begin(), e.end());
}

BitmapsExtension parsed_extension(uint32_t bitmaps, uint64_t dir_bytes) {
    auto ext = parse_bitmaps_extension(extension(bitmaps, dir_bytes, 10 * kCluster), geometry(),
                                       kFileSize);
    EXPECT_TRUE(ext.ok()) << ext.error().message();
    return ext.ok() ? *ext : BitmapsExtension{};
}

TEST(BitmapsTest, AnExtensionGivesItsDirectory) {
    auto ext = parse_bitmaps_extension(extension(2, 80, 3 * kCluster), geometry(), kFileSize);
    ASSERT_TRUE(ext.ok()) << ext.error().message();
    EXPECT_EQ(ext->bitmaps, 2U);
    EXPECT_EQ(ext->directory_bytes, 80U);
    EXPECT_EQ(ext->directory_offset, 3 * kCluster);
}

TEST(BitmapsTest, AnExtensionThatCannotBeFollowedIsRefused) {
    const Geometry g = geometry();
    EXPECT_FALSE(parse_bitmaps_extension(extension(1, 32, kCluster, 1), g, kFileSize).ok())
        << "reserved field set";
    EXPECT_FALSE(parse_bitmaps_extension(extension(0, 32, kCluster), g, kFileSize).ok())
        << "no bitmaps";
    EXPECT_FALSE(parse_bitmaps_extension(extension(1, 32, kCluster + 512), g, kFileSize).ok())
        << "misaligned directory";
    EXPECT_FALSE(parse_bitmaps_extension(extension(1, 32, kFileSize), g, kFileSize).ok())
        << "directory past the end of the file";
    EXPECT_FALSE(parse_bitmaps_extension(extension(1, 32, 0), g, kFileSize).ok())
        << "directory at offset 0";
    EXPECT_FALSE(parse_bitmaps_extension(extension(2, 24, kCluster), g, kFileSize).ok())
        << "directory too small for its entries";
    EXPECT_FALSE(parse_bitmaps_extension(extension(1, 65ULL << 20, kCluster), g, 1ULL << 30).ok())
        << "directory larger than the spec allows";
    std::vector<uint8_t> short_data = extension(1, 32, kCluster);
    short_data.resize(16);
    EXPECT_FALSE(parse_bitmaps_extension(short_data, g, kFileSize).ok()) << "short extension";
}

TEST(BitmapsTest, ADirectoryGivesEveryTableWithExtraDataAndNamesSkipped) {
    std::vector<uint8_t> dir;
    add_entry(&dir, 5 * kCluster, 1, "b0");
    add_entry(&dir, 6 * kCluster, 9000, "a-longer-name", 12);  // two clusters of table
    const BitmapsExtension ext = parsed_extension(2, dir.size());
    auto tables = parse_bitmap_directory(dir, ext, geometry(), kFileSize);
    ASSERT_TRUE(tables.ok()) << tables.error().message();
    ASSERT_EQ(tables->size(), 2U);
    EXPECT_EQ((*tables)[0].offset, 5 * kCluster);
    EXPECT_EQ((*tables)[0].entries, 1U);
    EXPECT_EQ((*tables)[1].offset, 6 * kCluster);
    EXPECT_EQ((*tables)[1].entries, 9000U);
}

TEST(BitmapsTest, ADirectoryThatDoesNotAddUpIsRefused) {
    const Geometry g = geometry();
    std::vector<uint8_t> dir;
    add_entry(&dir, 5 * kCluster, 1, "b0");
    std::vector<uint8_t> trailing = dir;
    trailing.resize(dir.size() + 8, 0);
    EXPECT_FALSE(
        parse_bitmap_directory(trailing, parsed_extension(1, trailing.size()), g, kFileSize).ok())
        << "bytes past the last entry";
    EXPECT_FALSE(parse_bitmap_directory(dir, parsed_extension(2, 48), g, kFileSize).ok())
        << "fewer entries than the extension says";

    auto refused = [&](uint64_t table_offset, uint32_t entries, const std::string& name) {
        std::vector<uint8_t> d;
        add_entry(&d, table_offset, entries, name);
        return !parse_bitmap_directory(d, parsed_extension(1, d.size()), g, kFileSize).ok();
    };
    EXPECT_FALSE(refused(5 * kCluster, 1, "ok"));
    EXPECT_TRUE(refused(5 * kCluster + 8, 1, "b0")) << "misaligned table";
    EXPECT_TRUE(refused(63 * kCluster, 8193, "b0")) << "table past the end of the file";
    EXPECT_TRUE(refused(0, 1, "b0")) << "table at offset 0";
    EXPECT_TRUE(refused(5 * kCluster, 0, "b0")) << "empty table";
    EXPECT_TRUE(refused(5 * kCluster, 1, "")) << "nameless bitmap";

    std::vector<uint8_t> overrun;
    add_entry(&overrun, 5 * kCluster, 1, "b0");
    store_be32(overrun.data() + 20, 4096);  // extra data past the directory
    EXPECT_FALSE(
        parse_bitmap_directory(overrun, parsed_extension(1, overrun.size()), g, kFileSize).ok());
}

std::vector<uint8_t> table(std::initializer_list<uint64_t> entries) {
    std::vector<uint8_t> t;
    for (uint64_t e : entries) {
        t.resize(t.size() + 8);
        store_be64(t.data() + t.size() - 8, e);
    }
    return t;
}

TEST(BitmapsTest, ATableNamesOnlyItsDataClusters) {
    std::vector<uint64_t> clusters;
    Status st = collect_bitmap_data_clusters(table({0, 1, 7 * kCluster, 0, 9 * kCluster}),
                                             geometry(), kFileSize, &clusters);
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(clusters, (std::vector<uint64_t>{7 * kCluster, 9 * kCluster}));
}

TEST(BitmapsTest, ATableEntryThatCannotBeFollowedIsRefused) {
    const Geometry g = geometry();
    std::vector<uint64_t> clusters;
    EXPECT_FALSE(collect_bitmap_data_clusters(table({2}), g, kFileSize, &clusters).ok())
        << "reserved bit without a cluster";
    EXPECT_FALSE(
        collect_bitmap_data_clusters(table({7 * kCluster | 1}), g, kFileSize, &clusters).ok())
        << "all-ones bit with a cluster";
    EXPECT_FALSE(
        collect_bitmap_data_clusters(table({7 * kCluster | (1ULL << 60)}), g, kFileSize, &clusters)
            .ok())
        << "high reserved bits";
    EXPECT_FALSE(
        collect_bitmap_data_clusters(table({7 * kCluster + 512}), g, kFileSize, &clusters).ok())
        << "misaligned cluster";
    EXPECT_FALSE(collect_bitmap_data_clusters(table({kFileSize}), g, kFileSize, &clusters).ok())
        << "cluster past the end of the file";
    EXPECT_TRUE(clusters.empty());
}

TEST(BitmapsTest, AnExtentCoversEachOfItsClustersOnce) {
    std::vector<uint64_t> clusters;
    append_clusters(2 * kCluster, kCluster + 1, geometry(), &clusters);
    append_clusters(5 * kCluster, 80, geometry(), &clusters);
    EXPECT_EQ(clusters, (std::vector<uint64_t>{2 * kCluster, 3 * kCluster, 5 * kCluster}));
}

}  // namespace
}  // namespace imgfs::qcow2
