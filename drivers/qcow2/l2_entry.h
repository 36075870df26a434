// L1/L2 entry encoding: what a table entry says about a (sub)cluster, and how to build one.
#pragma once

#include <cstdint>

#include "drivers/qcow2/format.h"

namespace imgfs::qcow2 {

inline constexpr uint64_t kOflagCopied = 1ULL << 63;
inline constexpr uint64_t kOflagCompressed = 1ULL << 62;
inline constexpr uint64_t kOflagZero = 1ULL << 0;
inline constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;  // bits 9..55
// One past the largest host byte an entry can name (56-bit offsets).
inline constexpr uint64_t kMaxHostEnd = 1ULL << 56;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffULL;
inline constexpr uint64_t kL2StandardReservedMask = 0x3f000000000001feULL;
inline constexpr uint64_t kRefTableReservedMask = 0x1ffULL;

/// What one subcluster (a whole cluster without extended L2) is.
enum class SubclusterType {
    kUnallocatedPlain,  // reads from the backing file; no host cluster
    kUnallocatedAlloc,  // reads from the backing file; the host cluster exists (extended L2)
    kZeroPlain,         // reads zeros; no host cluster
    kZeroAlloc,         // reads zeros; the host cluster exists (preallocated)
    kNormal,            // data at the host cluster
    kCompressed,        // compressed data
    kInvalid,           // contradictory bits: corruption
};

/// One L2 entry: the descriptor word, and for extended L2 the subcluster bitmap.
struct L2Entry {
    uint64_t word = 0;
    uint64_t bitmap = 0;

    [[nodiscard]] bool compressed() const { return (word & kOflagCompressed) != 0; }
    [[nodiscard]] bool copied() const { return (word & kOflagCopied) != 0; }
    /// Host cluster offset of a standard entry (0 if none).
    [[nodiscard]] uint64_t host_offset() const { return word & kOffsetMask; }
    [[nodiscard]] bool unallocated() const { return word == 0 && bitmap == 0; }
};

/// The type of subcluster `sc` (0 without extended L2).
SubclusterType subcluster_type(const Geometry& g, const L2Entry& e, uint32_t sc);

/// How many subclusters from `sc` on (up to the end of the cluster) have the same type.
uint32_t same_type_run(const Geometry& g, const L2Entry& e, uint32_t sc);

/// A reason the entry is malformed, or null (reserved bits, unaligned offsets, bad bitmaps).
const char* l2_entry_problem(const Geometry& g, const L2Entry& e);

/// Compressed descriptor fields.
struct CompressedRef {
    uint64_t host_offset;  // byte offset of the compressed stream
    uint64_t bytes;        // bytes to read (up to the end of its last 512-byte sector)
};
CompressedRef decode_compressed(const Geometry& g, uint64_t word);

/// Host clusters a compressed stream touches: [first, last] cluster indices.
inline void compressed_clusters(const Geometry& g, const CompressedRef& c, uint64_t* first,
                                uint64_t* last) {
    *first = c.host_offset >> g.cluster_bits;
    *last = (c.host_offset + c.bytes - 1) >> g.cluster_bits;
}

/// Reads/writes entry `index` of an L2 table held in memory (big-endian on disk).
L2Entry load_l2(const Geometry& g, const uint8_t* table, uint64_t index);
void store_l2(const Geometry& g, uint8_t* table, uint64_t index, const L2Entry& e);

/// Bitmask of subclusters [first, first + count) in the allocation half of a bitmap.
inline uint64_t alloc_bits(uint32_t first, uint32_t count) {
    uint64_t ones = count >= 32 ? 0xffffffffULL : ((1ULL << count) - 1);
    return (ones << first) & 0xffffffffULL;
}
inline uint64_t zero_bits(uint32_t first, uint32_t count) {
    return alloc_bits(first, count) << 32;
}

}  // namespace imgfs::qcow2
