// L2 entry decoding: subcluster types (standard and extended L2), runs of one type, malformed
// entries, compressed descriptors, the on-disk (big-endian) table layout and bitmap helpers.
#include "drivers/qcow2/l2_entry.h"

#include <vector>

#include <gtest/gtest.h>

namespace imgfs {
namespace {

using qcow2::alloc_bits;
using qcow2::CompressedRef;
using qcow2::Geometry;
using qcow2::Header;
using qcow2::kOflagCompressed;
using qcow2::kOflagCopied;
using qcow2::kOflagZero;
using qcow2::l2_entry_problem;
using qcow2::L2Entry;
using qcow2::same_type_run;
using qcow2::subcluster_type;
using qcow2::SubclusterType;
using qcow2::zero_bits;

using T = SubclusterType;

constexpr uint64_t kHost = 0x50000;  // a cluster-aligned host offset (64 KiB clusters)

Geometry geometry(uint32_t cluster_bits, bool extended) {
    Header h;
    h.cluster_bits = cluster_bits;
    h.incompatible = extended ? qcow2::kIncompatExtendedL2 : 0;
    return Geometry::from(h);
}

const Geometry kStd = geometry(16, false);
const Geometry kExt = geometry(16, true);

L2Entry entry(uint64_t word, uint64_t bitmap = 0) {
    return L2Entry{word, bitmap};
}

// ---- standard entries ----

TEST(Qcow2L2Entry, StandardTypes) {
    EXPECT_EQ(subcluster_type(kStd, entry(0), 0), T::kUnallocatedPlain);
    EXPECT_EQ(subcluster_type(kStd, entry(kOflagZero), 0), T::kZeroPlain);
    EXPECT_EQ(subcluster_type(kStd, entry(kHost | kOflagZero), 0), T::kZeroAlloc);
    EXPECT_EQ(subcluster_type(kStd, entry(kHost | kOflagZero | kOflagCopied), 0), T::kZeroAlloc);
    EXPECT_EQ(subcluster_type(kStd, entry(kHost), 0), T::kNormal);
    EXPECT_EQ(subcluster_type(kStd, entry(kHost | kOflagCopied), 0), T::kNormal);
    EXPECT_EQ(subcluster_type(kStd, entry(kOflagCompressed | 0x123456), 0), T::kCompressed);
    // A standard table has no bitmap: whatever is in the struct's bitmap does not count.
    EXPECT_EQ(subcluster_type(kStd, entry(kOflagCompressed | 0x123456, 1), 0), T::kCompressed);
    EXPECT_EQ(subcluster_type(kStd, entry(kHost, zero_bits(0, 1)), 0), T::kNormal);
}

TEST(Qcow2L2Entry, StandardInvalid) {
    // COPIED without a host cluster could only mean offset 0 of an external data file.
    EXPECT_EQ(subcluster_type(kStd, entry(kOflagCopied), 0), T::kInvalid);
}

TEST(Qcow2L2Entry, StandardEntryIsOneRun) {
    EXPECT_EQ(kStd.subclusters, 1U);
    EXPECT_EQ(same_type_run(kStd, entry(0), 0), 1U);
    EXPECT_EQ(same_type_run(kStd, entry(kHost), 0), 1U);
}

// ---- extended entries ----

TEST(Qcow2L2Entry, ExtendedTypesWithoutHostCluster) {
    EXPECT_EQ(subcluster_type(kExt, entry(0, 0), 7), T::kUnallocatedPlain);
    EXPECT_EQ(subcluster_type(kExt, entry(0, zero_bits(7, 1)), 7), T::kZeroPlain);
    EXPECT_EQ(subcluster_type(kExt, entry(0, zero_bits(7, 1)), 6), T::kUnallocatedPlain);
    // Allocated subclusters need a host cluster.
    EXPECT_EQ(subcluster_type(kExt, entry(0, alloc_bits(7, 1)), 7), T::kInvalid);
    // So does COPIED.
    EXPECT_EQ(subcluster_type(kExt, entry(kOflagCopied, 0), 7), T::kInvalid);
    EXPECT_EQ(subcluster_type(kExt, entry(kOflagCopied, zero_bits(7, 1)), 7), T::kInvalid);
}

TEST(Qcow2L2Entry, ExtendedTypesWithHostCluster) {
    const uint64_t w = kHost | kOflagCopied;
    EXPECT_EQ(subcluster_type(kExt, entry(w, alloc_bits(3, 1)), 3), T::kNormal);
    EXPECT_EQ(subcluster_type(kExt, entry(w, zero_bits(3, 1)), 3), T::kZeroAlloc);
    EXPECT_EQ(subcluster_type(kExt, entry(w, 0), 3), T::kUnallocatedAlloc);
    EXPECT_EQ(subcluster_type(kExt, entry(kHost, alloc_bits(3, 1)), 3), T::kNormal);
    // The last subcluster uses bits 31 and 63.
    EXPECT_EQ(subcluster_type(kExt, entry(w, 1ULL << 31), 31), T::kNormal);
    EXPECT_EQ(subcluster_type(kExt, entry(w, 1ULL << 63), 31), T::kZeroAlloc);
    EXPECT_EQ(subcluster_type(kExt, entry(w, 1ULL << 63), 30), T::kUnallocatedAlloc);
}

TEST(Qcow2L2Entry, ExtendedAllocatedAndZeroIsInvalid) {
    const uint64_t both = alloc_bits(5, 1) | zero_bits(5, 1);
    EXPECT_EQ(subcluster_type(kExt, entry(kHost, both), 5), T::kInvalid);
    EXPECT_EQ(subcluster_type(kExt, entry(0, both), 5), T::kInvalid);
    // Only that subcluster: its neighbours are read normally.
    EXPECT_EQ(subcluster_type(kExt, entry(kHost, both), 4), T::kUnallocatedAlloc);
}

TEST(Qcow2L2Entry, ExtendedCompressed) {
    EXPECT_EQ(subcluster_type(kExt, entry(kOflagCompressed | 0x12345, 0), 0), T::kCompressed);
    EXPECT_EQ(subcluster_type(kExt, entry(kOflagCompressed | 0x12345, 0), 31), T::kCompressed);
    // A compressed cluster's bitmap must be zero.
    EXPECT_EQ(subcluster_type(kExt, entry(kOflagCompressed | 0x12345, alloc_bits(0, 1)), 0),
              T::kInvalid);
    EXPECT_EQ(subcluster_type(kExt, entry(kOflagCompressed | 0x12345, zero_bits(9, 1)), 0),
              T::kInvalid);
}

TEST(Qcow2L2Entry, ExtendedRunsOfOneType) {
    //  sc:      0..3     4..7         8..11      12..31
    //  type:   normal  unalloc-alloc  zero-alloc  unalloc-alloc
    L2Entry e = entry(kHost | kOflagCopied, alloc_bits(0, 4) | zero_bits(8, 4));
    EXPECT_EQ(same_type_run(kExt, e, 0), 4U);
    EXPECT_EQ(same_type_run(kExt, e, 2), 2U);
    EXPECT_EQ(same_type_run(kExt, e, 3), 1U);
    EXPECT_EQ(same_type_run(kExt, e, 4), 4U);
    EXPECT_EQ(same_type_run(kExt, e, 8), 4U);
    EXPECT_EQ(same_type_run(kExt, e, 12), 20U);
    EXPECT_EQ(same_type_run(kExt, e, 31), 1U);  // stops at the end of the cluster

    EXPECT_EQ(same_type_run(kExt, entry(0, 0), 0), 32U);
    EXPECT_EQ(same_type_run(kExt, entry(kHost, alloc_bits(0, 32)), 0), 32U);
    EXPECT_EQ(same_type_run(kExt, entry(0, zero_bits(0, 32)), 5), 27U);
    EXPECT_EQ(same_type_run(kExt, entry(kOflagCompressed | 0x12345, 0), 0), 32U);
    // Alternating: every run is one subcluster.
    L2Entry alt = entry(kHost, 0x55555555ULL);
    for (uint32_t sc = 0; sc < 32; ++sc) {
        EXPECT_EQ(same_type_run(kExt, alt, sc), 1U) << sc;
    }
}

// ---- malformed entries ----

TEST(Qcow2L2Entry, WellFormedEntriesHaveNoProblem) {
    EXPECT_EQ(l2_entry_problem(kStd, entry(0)), nullptr);
    EXPECT_EQ(l2_entry_problem(kStd, entry(kOflagZero)), nullptr);
    EXPECT_EQ(l2_entry_problem(kStd, entry(kHost | kOflagCopied)), nullptr);
    EXPECT_EQ(l2_entry_problem(kStd, entry(kHost | kOflagZero)), nullptr);
    // A compressed descriptor's offset is not aligned and uses the "reserved" bits.
    EXPECT_EQ(l2_entry_problem(kStd, entry(kOflagCompressed | (3ULL << 54) | 0x12345)), nullptr);
    EXPECT_EQ(l2_entry_problem(kExt, entry(kHost | kOflagCopied, alloc_bits(0, 3))), nullptr);
    EXPECT_EQ(l2_entry_problem(kExt, entry(0, zero_bits(0, 32))), nullptr);
    EXPECT_EQ(l2_entry_problem(kExt, entry(kOflagCompressed | 0x12345, 0)), nullptr);
}

void expect_problem(const Geometry& g, const L2Entry& e, const std::string& what) {
    const char* p = qcow2::l2_entry_problem(g, e);
    ASSERT_NE(p, nullptr) << "no problem found in " << std::hex << e.word << "/" << e.bitmap;
    EXPECT_NE(std::string(p).find(what), std::string::npos) << p;
}

TEST(Qcow2L2Entry, Problems) {
    expect_problem(kStd, entry(kOflagCompressed | kOflagCopied | 0x12345), "COPIED");
    expect_problem(kExt, entry(kOflagCompressed | 0x12345, zero_bits(0, 1)),
                   "non-zero subcluster bitmap");
    // Reserved bits: 1..8 and 56..61.
    expect_problem(kStd, entry(kHost | (1ULL << 1)), "reserved bits");
    expect_problem(kStd, entry(kHost | (1ULL << 8)), "reserved bits");
    expect_problem(kStd, entry(kHost | (1ULL << 56)), "reserved bits");
    expect_problem(kStd, entry(kHost | (1ULL << 61)), "reserved bits");
    // Bits 9..15 are part of the offset field, but a 64 KiB cluster cannot start there.
    expect_problem(kStd, entry(kHost | 0x200), "not cluster aligned");
    expect_problem(kStd, entry(kHost | 0x8000 | kOflagCopied), "not cluster aligned");
    expect_problem(kStd, entry(kOflagCopied), "COPIED flag without a host cluster");
    expect_problem(kExt, entry(kHost | kOflagZero, 0), "standard zero flag");
    expect_problem(kExt, entry(kHost, alloc_bits(2, 1) | zero_bits(2, 1)),
                   "both allocated and zero");
    expect_problem(kExt, entry(0, alloc_bits(2, 1)), "allocated subclusters without a host");
    expect_problem(kExt, entry(kOflagCopied, 0), "COPIED flag without a host cluster");
}

TEST(Qcow2L2Entry, AlignmentFollowsTheClusterSize) {
    const Geometry small = geometry(9, false);
    EXPECT_EQ(l2_entry_problem(small, entry(0x200 | kOflagCopied)), nullptr);
    const Geometry big = geometry(21, false);
    expect_problem(big, entry(0x100000 | kOflagCopied), "not cluster aligned");
    EXPECT_EQ(l2_entry_problem(big, entry(0x200000 | kOflagCopied)), nullptr);
}

// ---- compressed descriptors ----
//
// Spec: x = 62 - (cluster_bits - 8); bits 0..x-1 are the host byte offset, bits x..61 the number
// of 512-byte sectors used beyond the one holding the offset. What must be read runs from the
// offset to the end of the last sector.

uint64_t spec_x(uint32_t cluster_bits) {
    return 62 - (cluster_bits - 8);
}

uint64_t compressed_word(uint32_t cluster_bits, uint64_t offset, uint64_t extra_sectors) {
    return kOflagCompressed | (extra_sectors << spec_x(cluster_bits)) | offset;
}

void expect_decodes(uint32_t cluster_bits, uint64_t offset, uint64_t extra_sectors) {
    const Geometry g = geometry(cluster_bits, false);
    ASSERT_EQ(g.compressed_offset_bits, spec_x(cluster_bits));
    const uint64_t word = compressed_word(cluster_bits, offset, extra_sectors);
    CompressedRef c = qcow2::decode_compressed(g, word);
    EXPECT_EQ(c.host_offset, offset) << "cluster_bits " << cluster_bits;
    EXPECT_EQ(c.bytes, (extra_sectors + 1) * 512 - offset % 512) << "cluster_bits " << cluster_bits;
    EXPECT_EQ(subcluster_type(g, entry(word), 0), T::kCompressed);
}

TEST(Qcow2L2Entry, DecodeCompressed64KiBClusters) {
    // x = 54: offset in bits 0..53, 8 bits of sector count.
    expect_decodes(16, 0x123456, 3);
    CompressedRef c = qcow2::decode_compressed(kStd, kOflagCompressed | (3ULL << 54) | 0x123456);
    EXPECT_EQ(c.host_offset, 0x123456U);
    EXPECT_EQ(c.bytes, 4 * 512U - 0x56U);       // to the end of the 4th sector
    expect_decodes(16, 0x10000, 0);             // sector aligned, one sector
    expect_decodes(16, (1ULL << 54) - 1, 255);  // every field at its maximum
}

TEST(Qcow2L2Entry, DecodeCompressed512ByteClusters) {
    // x = 61: a one-bit sector count.
    expect_decodes(9, 0x1000, 0);
    expect_decodes(9, 0x1001, 1);
    expect_decodes(9, (1ULL << 61) - 1, 1);
    CompressedRef c =
        qcow2::decode_compressed(geometry(9, false), kOflagCompressed | (1ULL << 61) | 0x1ff);
    EXPECT_EQ(c.host_offset, 0x1ffU);
    EXPECT_EQ(c.bytes, 513U);
}

TEST(Qcow2L2Entry, DecodeCompressed2MiBClusters) {
    // x = 49: 13 bits of sector count, enough for a stream of 4 MiB.
    expect_decodes(21, 0x7654321, 100);
    expect_decodes(21, (1ULL << 49) - 1, 8191);
    CompressedRef c = qcow2::decode_compressed(geometry(21, false),
                                               kOflagCompressed | (8191ULL << 49) | 0x400000);
    EXPECT_EQ(c.host_offset, 0x400000U);
    EXPECT_EQ(c.bytes, 4ULL << 20);
}

TEST(Qcow2L2Entry, DecodeCompressedIgnoresTheCopiedFlag) {
    // COPIED is a problem of the entry (reported elsewhere), not part of the sector count.
    uint64_t word = compressed_word(16, 0x123456, 3) | kOflagCopied;
    CompressedRef c = qcow2::decode_compressed(kStd, word);
    EXPECT_EQ(c.host_offset, 0x123456U);
    EXPECT_EQ(c.bytes, 4 * 512U - 0x56U);
}

TEST(Qcow2L2Entry, CompressedClustersTouched) {
    uint64_t first = 0;
    uint64_t last = 0;
    // Inside one cluster.
    qcow2::compressed_clusters(kStd, CompressedRef{0x50100, 0x200}, &first, &last);
    EXPECT_EQ(first, 5U);
    EXPECT_EQ(last, 5U);
    // Ending exactly at a cluster boundary.
    qcow2::compressed_clusters(kStd, CompressedRef{0x5fe00, 0x200}, &first, &last);
    EXPECT_EQ(first, 5U);
    EXPECT_EQ(last, 5U);
    // Crossing into the next one.
    qcow2::compressed_clusters(kStd, CompressedRef{0x5fe00, 0x201}, &first, &last);
    EXPECT_EQ(first, 5U);
    EXPECT_EQ(last, 6U);
}

// ---- tables in memory ----

TEST(Qcow2L2Entry, StandardTableRoundTrip) {
    std::vector<uint8_t> table(kStd.cluster_size, 0);
    const L2Entry a = entry(kOflagCopied | kHost);
    const L2Entry b = entry(compressed_word(16, 0x123456, 3));
    const L2Entry c = entry(kOflagZero);
    qcow2::store_l2(kStd, table.data(), 0, a);
    qcow2::store_l2(kStd, table.data(), 5, b);
    qcow2::store_l2(kStd, table.data(), kStd.l2_entries - 1, c);
    // Big-endian, 8 bytes per entry.
    const std::vector<uint8_t> a_bytes = {0x80, 0, 0, 0, 0, 0x05, 0, 0};
    EXPECT_EQ(std::vector<uint8_t>(table.begin(), table.begin() + 8), a_bytes);
    EXPECT_EQ(table[table.size() - 1], 0x01);
    EXPECT_EQ(qcow2::load_be64(table.data() + 40), b.word);

    L2Entry ra = qcow2::load_l2(kStd, table.data(), 0);
    EXPECT_EQ(ra.word, a.word);
    EXPECT_EQ(ra.bitmap, 0U);
    EXPECT_EQ(qcow2::load_l2(kStd, table.data(), 5).word, b.word);
    EXPECT_EQ(qcow2::load_l2(kStd, table.data(), kStd.l2_entries - 1).word, c.word);
    EXPECT_TRUE(qcow2::load_l2(kStd, table.data(), 1).unallocated());

    // A standard table has no room for a bitmap: storing one must not touch the next entry.
    qcow2::store_l2(kStd, table.data(), 1, entry(kHost, ~0ULL));
    EXPECT_EQ(qcow2::load_l2(kStd, table.data(), 2).word, 0U);
    EXPECT_EQ(qcow2::load_l2(kStd, table.data(), 1).bitmap, 0U);
}

TEST(Qcow2L2Entry, ExtendedTableRoundTrip) {
    std::vector<uint8_t> table(kExt.cluster_size, 0);
    const L2Entry a = entry(kOflagCopied | kHost, alloc_bits(0, 4) | zero_bits(8, 4));
    const L2Entry b = entry(0, zero_bits(0, 32));
    qcow2::store_l2(kExt, table.data(), 3, a);
    qcow2::store_l2(kExt, table.data(), kExt.l2_entries - 1, b);
    // 16 bytes per entry: the descriptor, then the bitmap.
    EXPECT_EQ(qcow2::load_be64(table.data() + 48), a.word);
    EXPECT_EQ(qcow2::load_be64(table.data() + 56), a.bitmap);
    EXPECT_EQ(qcow2::load_be64(table.data() + table.size() - 8), b.bitmap);
    EXPECT_EQ(table[56 + 7], 0x0f);  // alloc bits 0..3, the low byte of the big-endian bitmap
    EXPECT_EQ(table[56 + 2], 0x0f);  // zero bits 8..11 are bitmap bits 40..43

    L2Entry ra = qcow2::load_l2(kExt, table.data(), 3);
    EXPECT_EQ(ra.word, a.word);
    EXPECT_EQ(ra.bitmap, a.bitmap);
    L2Entry rb = qcow2::load_l2(kExt, table.data(), kExt.l2_entries - 1);
    EXPECT_EQ(rb.word, 0U);
    EXPECT_EQ(rb.bitmap, b.bitmap);
    EXPECT_FALSE(rb.unallocated());
    EXPECT_TRUE(qcow2::load_l2(kExt, table.data(), 2).unallocated());
    EXPECT_TRUE(qcow2::load_l2(kExt, table.data(), 4).unallocated());
}

TEST(Qcow2L2Entry, EntryAccessors) {
    L2Entry e = entry(kOflagCopied | kHost | kOflagZero);
    EXPECT_TRUE(e.copied());
    EXPECT_FALSE(e.compressed());
    EXPECT_EQ(e.host_offset(), kHost);
    EXPECT_FALSE(e.unallocated());
    // The offset field is bits 9..55.
    EXPECT_EQ(entry(~0ULL).host_offset(), 0x00fffffffffffe00ULL);
    EXPECT_TRUE(entry(kOflagCompressed).compressed());
}

// ---- bitmap helpers ----

TEST(Qcow2L2Entry, AllocAndZeroBits) {
    EXPECT_EQ(alloc_bits(0, 0), 0U);
    EXPECT_EQ(alloc_bits(0, 1), 0x1U);
    EXPECT_EQ(alloc_bits(3, 2), 0x18U);
    EXPECT_EQ(alloc_bits(31, 1), 0x80000000ULL);
    EXPECT_EQ(alloc_bits(0, 32), 0xffffffffULL);
    EXPECT_EQ(alloc_bits(4, 28), 0xfffffff0ULL);
    EXPECT_EQ(zero_bits(0, 0), 0U);
    EXPECT_EQ(zero_bits(0, 1), 1ULL << 32);
    EXPECT_EQ(zero_bits(31, 1), 1ULL << 63);
    EXPECT_EQ(zero_bits(0, 32), 0xffffffff00000000ULL);
    EXPECT_EQ(zero_bits(8, 4), 0xfULL << 40);
    // Each subcluster's two bits are what subcluster_type reads.
    for (uint32_t sc = 0; sc < 32; ++sc) {
        EXPECT_EQ(subcluster_type(kExt, entry(kHost, alloc_bits(sc, 1)), sc), T::kNormal);
        EXPECT_EQ(subcluster_type(kExt, entry(kHost, zero_bits(sc, 1)), sc), T::kZeroAlloc);
    }
}

}  // namespace
}  // namespace imgfs
