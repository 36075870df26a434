#include "drivers/qcow2/l2_entry.h"

namespace imgfs::qcow2 {

SubclusterType subcluster_type(const Geometry& g, const L2Entry& e, uint32_t sc) {
    if (e.compressed()) {
        return g.extended_l2 && e.bitmap != 0 ? SubclusterType::kInvalid
                                              : SubclusterType::kCompressed;
    }
    uint64_t host = e.host_offset();
    if (!g.extended_l2) {
        if ((e.word & kOflagZero) != 0) {
            return host != 0 ? SubclusterType::kZeroAlloc : SubclusterType::kZeroPlain;
        }
        if (host != 0) {
            return SubclusterType::kNormal;
        }
        // Offset 0 with COPIED set would mean host offset 0 of an external data file.
        return e.copied() ? SubclusterType::kInvalid : SubclusterType::kUnallocatedPlain;
    }
    bool alloc = ((e.bitmap >> sc) & 1) != 0;
    bool zero = ((e.bitmap >> (32 + sc)) & 1) != 0;
    if (alloc && zero) {
        return SubclusterType::kInvalid;
    }
    if (host == 0) {
        if (alloc || e.copied()) {
            return SubclusterType::kInvalid;
        }
        return zero ? SubclusterType::kZeroPlain : SubclusterType::kUnallocatedPlain;
    }
    if (alloc) {
        return SubclusterType::kNormal;
    }
    return zero ? SubclusterType::kZeroAlloc : SubclusterType::kUnallocatedAlloc;
}

uint32_t same_type_run(const Geometry& g, const L2Entry& e, uint32_t sc) {
    SubclusterType t = subcluster_type(g, e, sc);
    uint32_t n = 1;
    while (sc + n < g.subclusters && subcluster_type(g, e, sc + n) == t) {
        ++n;
    }
    return n;
}

const char* l2_entry_problem(const Geometry& g, const L2Entry& e) {
    if (e.compressed()) {
        if (e.copied()) {
            return "compressed cluster entry has the COPIED flag set";
        }
        if (g.extended_l2 && e.bitmap != 0) {
            return "compressed cluster entry has a non-zero subcluster bitmap";
        }
        return nullptr;
    }
    if ((e.word & kL2StandardReservedMask) != 0) {
        return "L2 entry has reserved bits set";
    }
    if (g.extended_l2 && (e.word & kOflagZero) != 0) {
        return "extended L2 entry uses the standard zero flag";
    }
    if ((e.host_offset() & (g.cluster_size - 1)) != 0) {
        return "L2 entry's host offset is not cluster aligned";
    }
    if (g.extended_l2) {
        uint64_t alloc = e.bitmap & 0xffffffffULL;
        uint64_t zero = e.bitmap >> 32;
        if ((alloc & zero) != 0) {
            return "subcluster marked both allocated and zero";
        }
        if (e.host_offset() == 0 && alloc != 0) {
            return "allocated subclusters without a host cluster";
        }
    }
    if (e.host_offset() == 0 && e.copied()) {
        return "COPIED flag without a host cluster";
    }
    return nullptr;
}

CompressedRef decode_compressed(const Geometry& g, uint64_t word) {
    const uint32_t x = g.compressed_offset_bits;
    uint64_t offset = word & ((1ULL << x) - 1);
    uint64_t extra_sectors = (word & ~kOflagCopied & ~kOflagCompressed) >> x;
    uint64_t bytes = (extra_sectors + 1) * 512 - (offset & 511);
    return CompressedRef{offset, bytes};
}

L2Entry load_l2(const Geometry& g, const uint8_t* table, uint64_t index) {
    const uint8_t* p = table + index * g.l2_entry_bytes;
    L2Entry e;
    e.word = load_be64(p);
    if (g.extended_l2) {
        e.bitmap = load_be64(p + 8);
    }
    return e;
}

void store_l2(const Geometry& g, uint8_t* table, uint64_t index, const L2Entry& e) {
    uint8_t* p = table + index * g.l2_entry_bytes;
    store_be64(p, e.word);
    if (g.extended_l2) {
        store_be64(p + 8, e.bitmap);
    }
}

}  // namespace imgfs::qcow2
