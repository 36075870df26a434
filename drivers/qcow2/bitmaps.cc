// qcow2 persistent bitmaps: parsing the extension, the directory and the tables into the
// clusters they use. (Spec: "Bitmaps" in docs/interop/qcow2.txt.)
#include "drivers/qcow2/bitmaps.h"

namespace imgfs::qcow2 {

namespace {

constexpr uint64_t kExtensionBytes = 24;
constexpr uint64_t kEntryFixedBytes = 24;
constexpr uint32_t kMaxBitmapNameBytes = 1023;
// Bitmap table entry: bits 9..55 a host cluster offset; bit 0 (all ones) only without one.
constexpr uint64_t kTableOffsetMask = 0x00fffffffffffe00ULL;
constexpr uint64_t kTableAllOnes = 1;

uint64_t round_up8(uint64_t v) {
    return (v + 7) & ~uint64_t{7};
}

// A cluster-aligned extent of `bytes` at `offset`, inside the file.
bool extent_ok(uint64_t offset, uint64_t bytes, const Geometry& g, uint64_t file_size) {
    return offset != 0 && g.in_cluster(offset) == 0 && offset <= file_size &&
           bytes <= file_size - offset;
}

}  // namespace

Result<BitmapsExtension> parse_bitmaps_extension(ConstBuf data, const Geometry& g,
                                                 uint64_t file_size) {
    if (data.size() < kExtensionBytes) {
        return make_error(EINVAL, "bitmaps extension of {} bytes, expected {}", data.size(),
                          kExtensionBytes);
    }
    BitmapsExtension ext;
    ext.bitmaps = load_be32(data.data());
    const uint32_t reserved = load_be32(data.data() + 4);
    ext.directory_bytes = load_be64(data.data() + 8);
    ext.directory_offset = load_be64(data.data() + 16);
    if (ext.bitmaps == 0 || ext.bitmaps > kMaxBitmaps || reserved != 0) {
        return make_error(EINVAL, "bitmaps extension: {} bitmaps, reserved field {:#x}",
                          ext.bitmaps, reserved);
    }
    if (ext.directory_bytes < ext.bitmaps * kEntryFixedBytes ||
        ext.directory_bytes > kMaxBitmapDirectoryBytes ||
        !extent_ok(ext.directory_offset, ext.directory_bytes, g, file_size)) {
        return make_error(EINVAL,
                          "bitmap directory of {} bytes at {:#x} is misaligned, outside the "
                          "file or of a size that cannot hold {} entries",
                          ext.directory_bytes, ext.directory_offset, ext.bitmaps);
    }
    return ext;
}

Result<std::vector<BitmapTableRef>> parse_bitmap_directory(ConstBuf directory,
                                                           const BitmapsExtension& ext,
                                                           const Geometry& g, uint64_t file_size) {
    if (directory.size() != ext.directory_bytes) {
        return make_error(EINVAL, "bitmap directory: {} bytes read, {} expected", directory.size(),
                          ext.directory_bytes);
    }
    std::vector<BitmapTableRef> tables;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < ext.bitmaps; ++i) {
        if (directory.size() - pos < kEntryFixedBytes) {
            return make_error(EINVAL, "bitmap directory ends inside entry {}", i);
        }
        const uint8_t* e = directory.data() + pos;
        BitmapTableRef t{load_be64(e), load_be32(e + 8)};
        const uint16_t name_bytes = load_be16(e + 18);
        const uint32_t extra_bytes = load_be32(e + 20);
        if (name_bytes == 0 || name_bytes > kMaxBitmapNameBytes) {
            return make_error(EINVAL, "bitmap directory entry {}: name of {} bytes", i, name_bytes);
        }
        const uint64_t entry_bytes =
            round_up8(kEntryFixedBytes + uint64_t{extra_bytes} + name_bytes);
        if (entry_bytes > directory.size() - pos) {
            return make_error(EINVAL, "bitmap directory entry {} runs past the directory", i);
        }
        if (t.entries == 0 || t.entries > kMaxBitmapTableEntries ||
            !extent_ok(t.offset, uint64_t{t.entries} * 8, g, file_size)) {
            return make_error(EINVAL,
                              "bitmap directory entry {}: table of {} entries at {:#x} is "
                              "misaligned or outside the file",
                              i, t.entries, t.offset);
        }
        tables.push_back(t);
        pos += entry_bytes;
    }
    if (pos != directory.size()) {
        return make_error(EINVAL, "bitmap directory has {} bytes past its {} entries",
                          directory.size() - pos, ext.bitmaps);
    }
    return tables;
}

Status collect_bitmap_data_clusters(ConstBuf table_part, const Geometry& g, uint64_t file_size,
                                    std::vector<uint64_t>* clusters) {
    for (uint64_t i = 0; i + 8 <= table_part.size(); i += 8) {
        const uint64_t entry = load_be64(table_part.data() + i);
        const uint64_t offset = entry & kTableOffsetMask;
        if (offset == 0) {
            if ((entry & ~kTableAllOnes) != 0) {
                return make_error(EINVAL, "bitmap table entry {:#x} has reserved bits set", entry);
            }
            continue;
        }
        if (entry != offset || !extent_ok(offset, g.cluster_size, g, file_size)) {
            return make_error(EINVAL,
                              "bitmap table entry {:#x}: reserved bits set, or its cluster is "
                              "misaligned or outside the file",
                              entry);
        }
        clusters->push_back(offset);
    }
    return {};
}

void append_clusters(uint64_t offset, uint64_t bytes, const Geometry& g,
                     std::vector<uint64_t>* clusters) {
    for (uint64_t at = g.cluster_start(offset); at < offset + bytes; at += g.cluster_size) {
        clusters->push_back(at);
    }
}

}  // namespace imgfs::qcow2
