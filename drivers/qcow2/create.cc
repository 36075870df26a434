#include "drivers/qcow2/create.h"

#include <cstring>
#include <unistd.h>

#include "drivers/qcow2/format.h"

namespace imgfs::qcow2 {

namespace {

std::vector<FeatureName> known_feature_names() {
    return {
        {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
        {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
        {2, 0, "bitmaps"},          {2, 1, "raw external data"},
    };
}

uint32_t log2_exact(uint64_t v) {
    uint32_t b = 0;
    while ((1ULL << b) < v) {
        ++b;
    }
    return b;
}

}  // namespace

Status validate_create_options(const CreateOptions& o) {
    if (!is_power_of_two(o.cluster_size) || o.cluster_size < 512 || o.cluster_size > (2U << 20)) {
        return make_error(EINVAL, "cluster size {} must be a power of two from 512 B to 2 MiB",
                          o.cluster_size);
    }
    if (!is_power_of_two(o.refcount_bits) || o.refcount_bits > 64) {
        return make_error(EINVAL, "refcount bits {} must be a power of two up to 64",
                          o.refcount_bits);
    }
    if (o.version != 2 && o.version != 3) {
        return make_error(EINVAL, "version {} is not 2 or 3", o.version);
    }
    if (o.version == 2 && (o.extended_l2 || o.lazy_refcounts || o.refcount_bits != 16)) {
        return make_error(EINVAL,
                          "extended L2, lazy refcounts and refcount bits other than 16 "
                          "need version 3 (compat=1.1)");
    }
    if (o.version == 2 && o.compression_type != CompressionType::kZlib) {
        return make_error(EINVAL, "compression type zstd needs version 3 (compat=1.1)");
    }
    if (o.extended_l2 && o.cluster_size < 16384) {
        return make_error(EINVAL, "extended L2 entries need a cluster size of at least 16 KiB");
    }
    if (o.size % 512 != 0) {
        return make_error(EINVAL, "size {} is not a multiple of 512", o.size);
    }
    if (o.backing_file.size() > kMaxBackingNameBytes) {
        return make_error(ENAMETOOLONG, "backing file name is longer than {} bytes",
                          kMaxBackingNameBytes);
    }
    if (o.backing_format && *o.backing_format != "qcow2" && *o.backing_format != "raw") {
        return make_error(EINVAL, "backing format '{}' is not qcow2 or raw", *o.backing_format);
    }
    return {};
}

Result<std::vector<uint8_t>> build_new_image(const CreateOptions& o) {
    TRY(validate_create_options(o));
    Header h;
    h.version = o.version;
    h.cluster_bits = log2_exact(o.cluster_size);
    h.size = o.size;
    h.refcount_order = log2_exact(o.refcount_bits);
    h.header_length = o.version == 3 ? kV3HeaderBytesWithCompression : kV2HeaderBytes;
    if (o.extended_l2) {
        h.incompatible |= kIncompatExtendedL2;
    }
    if (o.lazy_refcounts) {
        h.compatible |= kCompatLazyRefcounts;
    }
    h.compression_type = o.compression_type;
    if (o.compression_type != CompressionType::kZlib) {
        h.incompatible |= kIncompatCompression;
    }
    h.backing_file = o.backing_file;
    h.backing_format = o.backing_format;
    Geometry g = Geometry::from(h);
    const uint64_t cs = g.cluster_size;
    if (o.size > (uint64_t{1} << 62)) {  // what an open accepts (parse_header)
        return make_error(EFBIG, "size {} is too large: at most {} bytes", o.size,
                          uint64_t{1} << 62);
    }
    uint64_t l1_entries = g.l1_entries_for(o.size);
    if (l1_entries * 8 > kMaxL1Bytes) {
        return make_error(EFBIG, "size {} is too large for {}-byte clusters", o.size, cs);
    }
    uint64_t l1_clusters = (l1_entries * 8 + cs - 1) / cs;
    // Layout: header, refcount table, refcount blocks, L1 table; the blocks must count all of it.
    uint64_t table_clusters = 1;
    uint64_t blocks = 1;
    for (;;) {
        uint64_t total = 1 + table_clusters + blocks + l1_clusters;
        uint64_t need_blocks = (total + g.refblock_entries - 1) / g.refblock_entries;
        uint64_t need_table = (need_blocks * 8 + cs - 1) / cs;
        if (need_blocks == blocks && need_table == table_clusters) {
            break;
        }
        blocks = need_blocks;
        table_clusters = need_table;
    }
    const uint64_t total = 1 + table_clusters + blocks + l1_clusters;
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
    h.l1_table_offset = (1 + table_clusters + blocks) * cs;
    h.l1_size = static_cast<uint32_t>(l1_entries);
    if (o.version == 3) {
        // The feature name table helps other tools explain our bits; QEMU leaves it out when the
        // first cluster has no room, and so do we.
        Header with_names = h;
        with_names.feature_names = known_feature_names();
        if (serialize_header(&with_names).ok()) {
            h.feature_names = std::move(with_names.feature_names);
        }
    }
    TRY_ASSIGN(std::vector<uint8_t> header_area, serialize_header(&h));
    std::vector<uint8_t> image(total * cs, 0);
    std::memcpy(image.data(), header_area.data(), header_area.size());
    for (uint64_t b = 0; b < blocks; ++b) {
        store_be64(image.data() + cs + b * 8, (1 + table_clusters + b) * cs);
    }
    uint8_t* block0 = image.data() + (1 + table_clusters) * cs;
    for (uint64_t c = 0; c < total; ++c) {
        uint64_t entry = c % g.refblock_entries;
        uint8_t* blk = block0 + (c / g.refblock_entries) * cs;
        store_refcount(g, blk, entry, 1);
    }
    return image;
}

Task<Status> create_image(Node* file, CreateOptions options) {
    CO_TRY_ASSIGN(std::vector<uint8_t> image, build_new_image(options));
    CO_TRY(co_await file->write(0, ConstBuf(image.data(), image.size())));
    co_return co_await file->flush();
}

Status create_image_sync(int fd, const CreateOptions& options) {
    TRY_ASSIGN(std::vector<uint8_t> image, build_new_image(options));
    size_t done = 0;
    while (done < image.size()) {
        ssize_t n =
            ::pwrite(fd, image.data() + done, image.size() - done, static_cast<off_t>(done));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return make_error(errno, "writing the new image");
        }
        if (n == 0) {
            return make_error(EIO, "writing the new image: no progress at {}", done);
        }
        done += static_cast<size_t>(n);
    }
    if (::fsync(fd) != 0) {
        return make_error(errno, "fsync of the new image");
    }
    return {};
}

}  // namespace imgfs::qcow2
