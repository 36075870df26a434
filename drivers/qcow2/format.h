// qcow2 on-disk format: constants, the image header with its extensions, and the derived
// geometry. Parsing validates everything an image could lie about before any of it is used to
// size a table or compute an offset; a bad field is an error naming the field, never an assert.
// (Spec: docs/interop/qcow2.txt in QEMU's tree.)
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/result.h"

namespace imgfs::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1ULL << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ULL << 1;
inline constexpr uint64_t kIncompatDataFile = 1ULL << 2;
inline constexpr uint64_t kIncompatCompression = 1ULL << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ULL << 4;
// Compatible feature bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ULL << 0;
// Autoclear feature bits.
inline constexpr uint64_t kAutoclearBitmaps = 1ULL << 0;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

// Where each header field starts, named as in the spec. Parser, serializer and the partial
// header rewrites all use these names, so a field's place is written down once.
inline constexpr uint32_t kOffMagic = 0;
inline constexpr uint32_t kOffVersion = 4;
inline constexpr uint32_t kOffBackingFileOffset = 8;
inline constexpr uint32_t kOffBackingFileSize = 16;
inline constexpr uint32_t kOffClusterBits = 20;
inline constexpr uint32_t kOffSize = 24;
inline constexpr uint32_t kOffCryptMethod = 32;
inline constexpr uint32_t kOffL1Size = 36;
inline constexpr uint32_t kOffL1TableOffset = 40;
inline constexpr uint32_t kOffRefcountTableOffset = 48;
inline constexpr uint32_t kOffRefcountTableClusters = 56;
inline constexpr uint32_t kOffNbSnapshots = 60;
inline constexpr uint32_t kOffSnapshotsOffset = 64;
// Version 3 only.
inline constexpr uint32_t kOffIncompatibleFeatures = 72;
inline constexpr uint32_t kOffCompatibleFeatures = 80;
inline constexpr uint32_t kOffAutoclearFeatures = 88;
inline constexpr uint32_t kOffRefcountOrder = 96;
inline constexpr uint32_t kOffHeaderLength = 100;
// Only if header_length is larger than kV3HeaderBytes.
inline constexpr uint32_t kOffCompressionType = 104;
inline constexpr uint32_t kOffAdditionalFields = 105;  // padding, or fields newer than ours

inline constexpr uint32_t kV2HeaderBytes = kOffIncompatibleFeatures;
inline constexpr uint32_t kV3HeaderBytes = kOffCompressionType;
// What we write for v3: through compression_type, padded to 8.
inline constexpr uint32_t kV3HeaderBytesWithCompression = 112;
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;
inline constexpr uint32_t kMaxBackingNameBytes = 1023;
// Implementation limits, as QEMU's: bounds on what a header may make us allocate.
inline constexpr uint64_t kMaxL1Bytes = 32ULL << 20;
inline constexpr uint64_t kMaxRefcountTableBytes = 8ULL << 20;
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ULL << 20;

enum class CompressionType : uint8_t { kZlib = 0, kZstd = 1 };

struct FeatureName {
    uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
    uint8_t bit = 0;
    std::string name;
};

struct Extension {
    uint32_t type = 0;
    std::vector<uint8_t> data;
};

struct Header {
    uint32_t version = 3;
    uint32_t cluster_bits = 16;
    uint64_t size = 0;
    uint32_t crypt_method = 0;
    uint32_t l1_size = 0;
    uint64_t l1_table_offset = 0;
    uint64_t refcount_table_offset = 0;
    uint32_t refcount_table_clusters = 0;
    uint32_t nb_snapshots = 0;
    uint64_t snapshots_offset = 0;
    uint64_t incompatible = 0;
    uint64_t compatible = 0;
    uint64_t autoclear = 0;
    uint32_t refcount_order = 4;
    uint32_t header_length = kV3HeaderBytesWithCompression;
    CompressionType compression_type = CompressionType::kZlib;
    /// Additional header fields we do not interpret (kOffAdditionalFields .. header_length),
    /// kept as they are.
    std::vector<uint8_t> unknown_fields;

    std::string backing_file;  // empty: none
    std::optional<std::string> backing_format;
    std::vector<FeatureName> feature_names;
    /// Extensions we do not interpret (bitmaps, encryption, unknown), in file order, preserved.
    std::vector<Extension> other_extensions;

    // Where the parsed image kept things (informational; serialize decides anew).
    uint64_t backing_file_offset = 0;
    uint32_t backing_file_size = 0;

    [[nodiscard]] uint64_t cluster_size() const { return 1ULL << cluster_bits; }
    [[nodiscard]] bool extended_l2() const { return (incompatible & kIncompatExtendedL2) != 0; }
    /// "dirty, extended_l2" for messages; unknown bits are named from the feature table.
    [[nodiscard]] std::string describe_incompatible(uint64_t bits) const;
};

/// Parses and validates the header area (the image's first cluster, or the whole file if it
/// is shorter). `file_size` bounds every offset the header gives. `image` names the file in
/// messages.
Result<Header> parse_header(ConstBuf first_cluster, uint64_t file_size, const std::string& image);

/// Serialises the header, its extensions and the backing file name into one cluster. The
/// backing name goes after the extensions; backing_file_offset/size are set accordingly.
Result<std::vector<uint8_t>> serialize_header(Header* header);

/// Derived sizes and shifts.
struct Geometry {
    uint32_t cluster_bits = 16;
    uint64_t cluster_size = 1ULL << 16;
    bool extended_l2 = false;
    uint32_t l2_entry_bytes = 8;
    uint32_t l2_bits = 13;  // log2(entries per L2 table)
    uint64_t l2_entries = 1ULL << 13;
    uint32_t subcluster_bits = 16;
    uint64_t subcluster_size = 1ULL << 16;
    uint32_t subclusters = 1;
    uint32_t refcount_order = 4;
    uint32_t refcount_bits = 16;
    uint64_t refblock_entries = 0;
    uint64_t refcount_max = 0;
    uint32_t compressed_offset_bits = 0;  // x in the spec: host offset in bits 0..x-1

    static Geometry from(const Header& h);

    [[nodiscard]] uint64_t l1_index(uint64_t guest) const {
        return guest >> (cluster_bits + l2_bits);
    }
    [[nodiscard]] uint64_t l2_index(uint64_t guest) const {
        return (guest >> cluster_bits) & (l2_entries - 1);
    }
    [[nodiscard]] uint64_t in_cluster(uint64_t off) const { return off & (cluster_size - 1); }
    [[nodiscard]] uint64_t cluster_start(uint64_t off) const { return off & ~(cluster_size - 1); }
    [[nodiscard]] uint32_t subcluster_index(uint64_t guest) const {
        return static_cast<uint32_t>(in_cluster(guest) >> subcluster_bits);
    }
    /// Bytes of guest space one L2 table maps.
    [[nodiscard]] uint64_t l2_span() const { return cluster_size << l2_bits; }
    /// L1 entries needed for a virtual size.
    [[nodiscard]] uint64_t l1_entries_for(uint64_t size) const {
        return (size + l2_span() - 1) / l2_span();
    }
};

// Big-endian access.
inline uint16_t load_be16(const uint8_t* p) {
    return static_cast<uint16_t>((p[0] << 8) | p[1]);
}
inline uint32_t load_be32(const uint8_t* p) {
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}
inline uint64_t load_be64(const uint8_t* p) {
    return (uint64_t{load_be32(p)} << 32) | load_be32(p + 4);
}
inline void store_be16(uint8_t* p, uint16_t v) {
    p[0] = static_cast<uint8_t>(v >> 8);
    p[1] = static_cast<uint8_t>(v);
}
inline void store_be32(uint8_t* p, uint32_t v) {
    p[0] = static_cast<uint8_t>(v >> 24);
    p[1] = static_cast<uint8_t>(v >> 16);
    p[2] = static_cast<uint8_t>(v >> 8);
    p[3] = static_cast<uint8_t>(v);
}
inline void store_be64(uint8_t* p, uint64_t v) {
    store_be32(p, static_cast<uint32_t>(v >> 32));
    store_be32(p + 4, static_cast<uint32_t>(v));
}

/// Entry `index` of a refcount block, in the image's refcount width (1 to 64 bits).
uint64_t load_refcount(const Geometry& g, const uint8_t* block, uint64_t index);
/// Sets entry `index` of a refcount block to `value` (which must fit the width).
void store_refcount(const Geometry& g, uint8_t* block, uint64_t index, uint64_t value);

}  // namespace imgfs::qcow2
