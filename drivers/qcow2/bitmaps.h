// qcow2 persistent bitmaps, as far as imgfs deals with them: finding every cluster they use, so
// that they can be freed. imgfs keeps no bitmap up to date; a writer that does not must clear
// autoclear bit 0 (the spec's "bitmaps extension bit"), and from then on QEMU takes the bitmaps
// for invalid and counts their clusters as leaked. Dropping them whole leaves nothing leaked.
//
// Parsing is pure (bytes in, cluster offsets out) and refuses anything it does not understand
// fully: a cluster freed on a misread offset could be live data. A refusal leaves the clusters
// allocated, which costs space and nothing else.
#pragma once

#include <cstdint>
#include <vector>

#include "core/buffer.h"
#include "core/result.h"
#include "drivers/qcow2/format.h"

namespace imgfs::qcow2 {

// Limits from the spec and QEMU's implementation; larger values are refused, not followed.
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectoryBytes = 64ULL << 20;
inline constexpr uint32_t kMaxBitmapTableEntries = 0x8000000;

/// The bitmaps header extension's fields.
struct BitmapsExtension {
    uint32_t bitmaps = 0;
    uint64_t directory_bytes = 0;
    uint64_t directory_offset = 0;
};

/// One bitmap directory entry, as far as its clusters go.
struct BitmapTableRef {
    uint64_t offset = 0;
    uint32_t entries = 0;  // 8 bytes each
};

/// Validates the extension's data against the geometry and the file: the directory must be
/// cluster-aligned and inside the file.
Result<BitmapsExtension> parse_bitmaps_extension(ConstBuf data, const Geometry& g,
                                                 uint64_t file_size);

/// Parses the directory (exactly `ext.directory_bytes` bytes): `ext.bitmaps` entries, each
/// 8-aligned, filling the directory exactly. Every table must be cluster-aligned and inside
/// the file.
Result<std::vector<BitmapTableRef>> parse_bitmap_directory(ConstBuf directory,
                                                           const BitmapsExtension& ext,
                                                           const Geometry& g, uint64_t file_size);

/// Appends the data clusters (host offsets) a part of a bitmap table names. Entries without a
/// cluster (all zeros, all ones) name none; reserved bits or a cluster outside the file are
/// errors.
Status collect_bitmap_data_clusters(ConstBuf table_part, const Geometry& g, uint64_t file_size,
                                    std::vector<uint64_t>* clusters);

/// The clusters [offset, offset + bytes) occupies, appended as host offsets.
void append_clusters(uint64_t offset, uint64_t bytes, const Geometry& g,
                     std::vector<uint64_t>* clusters);

}  // namespace imgfs::qcow2
