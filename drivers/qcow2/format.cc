#include "drivers/qcow2/format.h"

#include <algorithm>
#include <cstring>

namespace imgfs::qcow2 {

namespace {

constexpr uint64_t kKnownIncompatible = kIncompatDirty | kIncompatCorrupt | kIncompatDataFile |
                                        kIncompatCompression | kIncompatExtendedL2;

const char* builtin_feature_name(uint8_t type, uint8_t bit) {
    if (type == 0) {
        switch (bit) {
            case 0:
                return "dirty bit";
            case 1:
                return "corrupt bit";
            case 2:
                return "external data file";
            case 3:
                return "compression type";
            case 4:
                return "extended L2 entries";
            default:
                return nullptr;
        }
    }
    if (type == 1 && bit == 0) {
        return "lazy refcounts";
    }
    if (type == 2 && bit == 0) {
        return "bitmaps";
    }
    if (type == 2 && bit == 1) {
        return "raw external data";
    }
    return nullptr;
}

bool aligned(uint64_t v, uint64_t a) {
    return (v & (a - 1)) == 0;
}

// A table of `bytes` at `offset` must be cluster aligned and lie inside the file.
Status check_table(const std::string& image, const char* what, uint64_t offset, uint64_t bytes,
                   uint64_t cluster_size, uint64_t file_size) {
    if (!aligned(offset, cluster_size)) {
        return make_error(EINVAL, "{}: {} offset {:#x} is not cluster aligned", image, what,
                          offset);
    }
    if (offset == 0 && bytes != 0) {
        return make_error(EINVAL, "{}: {} at offset 0 overlaps the header", image, what);
    }
    if (offset > file_size || bytes > file_size - offset) {
        return make_error(EINVAL, "{}: {} ({} bytes at {:#x}) lies beyond the end of the file ({})",
                          image, what, bytes, offset, file_size);
    }
    return {};
}

Status parse_fixed_fields(ConstBuf b, Header* h, const std::string& image) {
    const uint8_t* p = b.data();
    h->version = load_be32(p + kOffVersion);
    if (h->version != 2 && h->version != 3) {
        return make_error(ENOTSUP, "{}: qcow2 version {} is not supported (only 2 and 3)", image,
                          h->version);
    }
    h->backing_file_offset = load_be64(p + kOffBackingFileOffset);
    h->backing_file_size = load_be32(p + kOffBackingFileSize);
    h->cluster_bits = load_be32(p + kOffClusterBits);
    if (h->cluster_bits < kMinClusterBits || h->cluster_bits > kMaxClusterBits) {
        return make_error(EINVAL, "{}: cluster_bits {} is out of range ({}..{})", image,
                          h->cluster_bits, kMinClusterBits, kMaxClusterBits);
    }
    h->size = load_be64(p + kOffSize);
    h->crypt_method = load_be32(p + kOffCryptMethod);
    h->l1_size = load_be32(p + kOffL1Size);
    h->l1_table_offset = load_be64(p + kOffL1TableOffset);
    h->refcount_table_offset = load_be64(p + kOffRefcountTableOffset);
    h->refcount_table_clusters = load_be32(p + kOffRefcountTableClusters);
    h->nb_snapshots = load_be32(p + kOffNbSnapshots);
    h->snapshots_offset = load_be64(p + kOffSnapshotsOffset);
    if (h->version == 2) {
        h->incompatible = h->compatible = h->autoclear = 0;
        h->refcount_order = 4;
        h->header_length = kV2HeaderBytes;
        return {};
    }
    if (b.size() < kV3HeaderBytes) {
        return make_error(EINVAL, "{}: file too short for a version 3 header", image);
    }
    h->incompatible = load_be64(p + kOffIncompatibleFeatures);
    h->compatible = load_be64(p + kOffCompatibleFeatures);
    h->autoclear = load_be64(p + kOffAutoclearFeatures);
    h->refcount_order = load_be32(p + kOffRefcountOrder);
    h->header_length = load_be32(p + kOffHeaderLength);
    if (h->header_length < kV3HeaderBytes || h->header_length % 8 != 0 ||
        h->header_length > h->cluster_size() || h->header_length > b.size()) {
        return make_error(EINVAL, "{}: header_length {} is invalid", image, h->header_length);
    }
    if (h->refcount_order > 6) {
        return make_error(EINVAL, "{}: refcount_order {} is out of range (0..6)", image,
                          h->refcount_order);
    }
    if (h->header_length > kOffCompressionType) {
        h->compression_type = static_cast<CompressionType>(p[kOffCompressionType]);
        h->unknown_fields.assign(p + kOffAdditionalFields, p + h->header_length);
    }
    return {};
}

// A name stored with its length, up to its first NUL byte as QEMU reads it (a C string): the
// file opened is the one before the NUL, so that is the name compared and shown.
std::string c_string(const uint8_t* data, size_t len) {
    const auto* chars = reinterpret_cast<const char*>(data);
    return std::string(chars, ::strnlen(chars, len));
}

Status parse_extensions(ConstBuf b, Header* h, const std::string& image) {
    if (h->version == 2 && b.size() < kV2HeaderBytes) {
        return make_error(EINVAL, "{}: file too short for a qcow2 header", image);
    }
    uint64_t pos = h->header_length;
    // The extension area ends at the backing file name if there is one, else at the cluster end.
    uint64_t end = b.size();
    if (h->backing_file_offset != 0 && h->backing_file_offset < end) {
        end = h->backing_file_offset;
    }
    bool seen_backing_format = false;
    while (pos + 8 <= end) {
        uint32_t type = load_be32(b.data() + pos);
        uint32_t len = load_be32(b.data() + pos + 4);
        pos += 8;
        if (type == kExtEnd) {
            return {};
        }
        if (len > end - pos) {
            return make_error(EINVAL,
                              "{}: header extension {:#x} (length {}) runs past the header "
                              "area",
                              image, type, len);
        }
        const uint8_t* d = b.data() + pos;
        switch (type) {
            case kExtBackingFormat:
                if (seen_backing_format) {
                    return make_error(EINVAL, "{}: duplicate backing format extension", image);
                }
                seen_backing_format = true;
                h->backing_format = c_string(d, len);
                break;
            case kExtFeatureTable:
                // Names for error messages only, so nothing in it refuses the image (QEMU
                // opens it too): whole entries of a second table or past a partial one count,
                // a partial entry is dropped (and so is it from a header imgfs rewrites).
                for (uint32_t i = 0; i + 48 <= len; i += 48) {
                    FeatureName f;
                    f.type = d[i];
                    f.bit = d[i + 1];
                    const char* name = reinterpret_cast<const char*>(d + i + 2);
                    f.name.assign(name, strnlen(name, 46));
                    h->feature_names.push_back(std::move(f));
                }
                break;
            default:
                h->other_extensions.push_back(Extension{type, std::vector<uint8_t>(d, d + len)});
                break;
        }
        pos += (uint64_t{len} + 7) & ~uint64_t{7};
    }
    return {};  // no end marker before the area's end: accepted, as QEMU does
}

Status validate(Header* h, uint64_t file_size, const std::string& image) {
    const uint64_t cs = h->cluster_size();
    uint64_t unknown = h->incompatible & ~kKnownIncompatible;
    if (unknown != 0) {
        return make_error(ENOTSUP, "{}: unknown incompatible feature(s): {}", image,
                          h->describe_incompatible(unknown));
    }
    if ((h->incompatible & kIncompatDataFile) != 0) {
        return make_error(ENOTSUP, "{}: images with an external data file are not supported",
                          image);
    }
    if (h->crypt_method != 0) {
        return make_error(ENOTSUP, "{}: encrypted images are not supported (crypt_method {})",
                          image, h->crypt_method);
    }
    bool compression_bit = (h->incompatible & kIncompatCompression) != 0;
    auto ct = static_cast<uint8_t>(h->compression_type);
    if (ct > 1 || compression_bit != (ct != 0)) {
        return make_error(EINVAL,
                          "{}: compression type {} does not match the compression feature "
                          "bit",
                          image, ct);
    }
    if (h->extended_l2() && h->cluster_bits < 14) {
        return make_error(EINVAL, "{}: extended L2 entries need clusters of at least 16 KiB",
                          image);
    }
    if (h->backing_file_offset != 0) {
        if (h->backing_file_size > kMaxBackingNameBytes || h->backing_file_size == 0 ||
            h->backing_file_offset > cs || h->backing_file_size > cs - h->backing_file_offset) {
            return make_error(EINVAL, "{}: backing file name ({} bytes at {}) is invalid", image,
                              h->backing_file_size, h->backing_file_offset);
        }
    }
    uint64_t l1_bytes = uint64_t{h->l1_size} * 8;
    if (l1_bytes > kMaxL1Bytes) {
        return make_error(EFBIG, "{}: L1 table of {} entries is too large", image, h->l1_size);
    }
    Geometry g = Geometry::from(*h);
    if (h->size > (uint64_t{1} << 62) || g.l1_entries_for(h->size) > h->l1_size) {
        return make_error(EINVAL, "{}: L1 table ({} entries) is too small for a virtual size of {}",
                          image, h->l1_size, h->size);
    }
    TRY(check_table(image, "L1 table", h->l1_table_offset, l1_bytes, cs, file_size));
    uint64_t rt_bytes = uint64_t{h->refcount_table_clusters} * cs;
    if (h->refcount_table_clusters == 0 || rt_bytes > kMaxRefcountTableBytes) {
        return make_error(EINVAL, "{}: refcount table size ({} clusters) is invalid", image,
                          h->refcount_table_clusters);
    }
    TRY(check_table(image, "refcount table", h->refcount_table_offset, rt_bytes, cs, file_size));
    if (h->nb_snapshots > kMaxSnapshots) {
        return make_error(EINVAL, "{}: {} snapshots exceed the limit of {}", image, h->nb_snapshots,
                          kMaxSnapshots);
    }
    if (h->nb_snapshots != 0) {
        // Each entry is at least 40 bytes; the table itself is checked when it is read.
        TRY(check_table(image, "snapshot table", h->snapshots_offset,
                        uint64_t{h->nb_snapshots} * 40, cs, file_size));
    }
    return {};
}

}  // namespace

std::string Header::describe_incompatible(uint64_t bits) const {
    std::string out;
    for (uint8_t bit = 0; bit < 64; ++bit) {
        if ((bits & (1ULL << bit)) == 0) {
            continue;
        }
        std::string name;
        for (const auto& f : feature_names) {
            if (f.type == 0 && f.bit == bit) {
                name = f.name;
            }
        }
        if (name.empty()) {
            const char* b = builtin_feature_name(0, bit);
            name = b != nullptr ? b : fmt::format("bit {}", bit);
        }
        out += out.empty() ? "" : ", ";
        out += name;
    }
    return out;
}

Result<Header> parse_header(ConstBuf b, uint64_t file_size, const std::string& image) {
    if (b.size() < kV2HeaderBytes || load_be32(b.data() + kOffMagic) != kMagic) {
        return make_error(EINVAL, "{}: not a qcow2 image (bad magic)", image);
    }
    Header h;
    TRY(parse_fixed_fields(b, &h, image));
    if (b.size() > h.cluster_size()) {
        b = b.first(h.cluster_size());
    }
    TRY(parse_extensions(b, &h, image));
    if (h.backing_file_offset != 0) {
        if (h.backing_file_offset > b.size() ||
            h.backing_file_size > b.size() - h.backing_file_offset) {
            return make_error(EINVAL, "{}: backing file name lies outside the header cluster",
                              image);
        }
        h.backing_file = c_string(b.data() + h.backing_file_offset, h.backing_file_size);
    }
    TRY(validate(&h, file_size, image));
    return h;
}

namespace {

void append_extension(std::vector<uint8_t>* out, uint32_t type, const uint8_t* data, size_t len) {
    size_t pos = out->size();
    out->resize(pos + 8 + ((len + 7) & ~size_t{7}), 0);
    store_be32(out->data() + pos, type);
    store_be32(out->data() + pos + 4, static_cast<uint32_t>(len));
    if (len != 0) {
        std::memcpy(out->data() + pos + 8, data, len);
    }
}

// The header extensions (backing format, feature names, the preserved unknown ones), then the
// end marker.
void append_extensions(const Header& h, std::vector<uint8_t>* out) {
    if (h.backing_format && !h.backing_file.empty()) {
        append_extension(out, kExtBackingFormat,
                         reinterpret_cast<const uint8_t*>(h.backing_format->data()),
                         h.backing_format->size());
    }
    if (!h.feature_names.empty()) {
        std::vector<uint8_t> table(h.feature_names.size() * 48, 0);
        for (size_t i = 0; i < h.feature_names.size(); ++i) {
            table[i * 48] = h.feature_names[i].type;
            table[i * 48 + 1] = h.feature_names[i].bit;
            std::memcpy(table.data() + i * 48 + 2, h.feature_names[i].name.data(),
                        std::min<size_t>(h.feature_names[i].name.size(), 46));
        }
        append_extension(out, kExtFeatureTable, table.data(), table.size());
    }
    for (const Extension& e : h.other_extensions) {
        append_extension(out, e.type, e.data.data(), e.data.size());
    }
    append_extension(out, kExtEnd, nullptr, 0);
}

// The fixed part of the header (`fixed` bytes at `p`).
void store_fixed_fields(const Header& h, uint32_t fixed, uint8_t* p) {
    store_be32(p + kOffMagic, kMagic);
    store_be32(p + kOffVersion, h.version);
    store_be64(p + kOffBackingFileOffset, h.backing_file_offset);
    store_be32(p + kOffBackingFileSize, h.backing_file_size);
    store_be32(p + kOffClusterBits, h.cluster_bits);
    store_be64(p + kOffSize, h.size);
    store_be32(p + kOffCryptMethod, h.crypt_method);
    store_be32(p + kOffL1Size, h.l1_size);
    store_be64(p + kOffL1TableOffset, h.l1_table_offset);
    store_be64(p + kOffRefcountTableOffset, h.refcount_table_offset);
    store_be32(p + kOffRefcountTableClusters, h.refcount_table_clusters);
    store_be32(p + kOffNbSnapshots, h.nb_snapshots);
    store_be64(p + kOffSnapshotsOffset, h.snapshots_offset);
    if (h.version != 3) {
        return;
    }
    store_be64(p + kOffIncompatibleFeatures, h.incompatible);
    store_be64(p + kOffCompatibleFeatures, h.compatible);
    store_be64(p + kOffAutoclearFeatures, h.autoclear);
    store_be32(p + kOffRefcountOrder, h.refcount_order);
    store_be32(p + kOffHeaderLength, fixed);
    if (fixed > kOffCompressionType) {
        p[kOffCompressionType] = static_cast<uint8_t>(h.compression_type);
        size_t n = std::min<size_t>(h.unknown_fields.size(), fixed - kOffAdditionalFields);
        if (n > 0) {  // data() may be null when empty, and memcpy forbids that
            std::memcpy(p + kOffAdditionalFields, h.unknown_fields.data(), n);
        }
    }
}

}  // namespace

Result<std::vector<uint8_t>> serialize_header(Header* h) {
    const uint64_t cs = h->cluster_size();
    std::vector<uint8_t> out;
    uint32_t fixed = h->version == 2 ? kV2HeaderBytes : h->header_length;
    if (h->version == 3 && fixed < kV3HeaderBytes) {
        fixed = kV3HeaderBytes;
    }
    out.resize(fixed, 0);
    append_extensions(*h, &out);
    if (!h->backing_file.empty()) {
        if (h->backing_file.size() > kMaxBackingNameBytes) {
            return make_error(ENAMETOOLONG, "backing file name is longer than {} bytes",
                              kMaxBackingNameBytes);
        }
        h->backing_file_offset = out.size();
        h->backing_file_size = static_cast<uint32_t>(h->backing_file.size());
        out.insert(out.end(), h->backing_file.begin(), h->backing_file.end());
    } else {
        h->backing_file_offset = 0;
        h->backing_file_size = 0;
    }
    if (out.size() > cs) {
        return make_error(ENOSPC,
                          "the header, its extensions and the backing file name ({} bytes) "
                          "do not fit in one {}-byte cluster",
                          out.size(), cs);
    }
    store_fixed_fields(*h, fixed, out.data());
    return out;
}

Geometry Geometry::from(const Header& h) {
    Geometry g;
    g.cluster_bits = h.cluster_bits;
    g.cluster_size = 1ULL << h.cluster_bits;
    g.extended_l2 = h.extended_l2();
    g.l2_entry_bytes = g.extended_l2 ? 16 : 8;
    g.l2_bits = h.cluster_bits - (g.extended_l2 ? 4 : 3);
    g.l2_entries = 1ULL << g.l2_bits;
    g.subclusters = g.extended_l2 ? 32 : 1;
    g.subcluster_bits = g.extended_l2 ? h.cluster_bits - 5 : h.cluster_bits;
    g.subcluster_size = 1ULL << g.subcluster_bits;
    g.refcount_order = h.refcount_order;
    g.refcount_bits = 1U << h.refcount_order;
    g.refblock_entries = (g.cluster_size * 8) >> h.refcount_order;
    g.refcount_max = g.refcount_bits == 64 ? UINT64_MAX : (1ULL << g.refcount_bits) - 1;
    g.compressed_offset_bits = 62 - (h.cluster_bits - 8);
    return g;
}

uint64_t load_refcount(const Geometry& g, const uint8_t* block, uint64_t index) {
    switch (g.refcount_order) {
        case 0:
        case 1:
        case 2: {
            uint32_t bits = g.refcount_bits;
            uint32_t per_byte = 8 / bits;
            uint32_t shift = static_cast<uint32_t>(index % per_byte) * bits;
            return (block[index / per_byte] >> shift) & ((1U << bits) - 1);
        }
        case 3:
            return block[index];
        case 4:
            return load_be16(block + index * 2);
        case 5:
            return load_be32(block + index * 4);
        default:
            return load_be64(block + index * 8);
    }
}

void store_refcount(const Geometry& g, uint8_t* block, uint64_t index, uint64_t value) {
    switch (g.refcount_order) {
        case 0:
        case 1:
        case 2: {
            uint32_t bits = g.refcount_bits;
            uint32_t per_byte = 8 / bits;
            uint32_t shift = static_cast<uint32_t>(index % per_byte) * bits;
            uint8_t mask = static_cast<uint8_t>(((1U << bits) - 1) << shift);
            uint8_t& b = block[index / per_byte];
            b = static_cast<uint8_t>((b & ~mask) | ((value << shift) & mask));
            break;
        }
        case 3:
            block[index] = static_cast<uint8_t>(value);
            break;
        case 4:
            store_be16(block + index * 2, static_cast<uint16_t>(value));
            break;
        case 5:
            store_be32(block + index * 4, static_cast<uint32_t>(value));
            break;
        default:
            store_be64(block + index * 8, value);
            break;
    }
}

}  // namespace imgfs::qcow2
