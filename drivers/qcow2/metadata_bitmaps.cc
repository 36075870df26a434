// Metadata: dropping persistent bitmaps when the image becomes writable. imgfs keeps no bitmap
// up to date, so it must clear autoclear bit 0 before it writes; QEMU then takes the bitmaps
// for invalid and counts their clusters as leaked. Instead the bitmaps go whole:
//  1. Find every cluster they use (directory, tables, data). Anything malformed: none.
//  2. One header write drops the extension with the autoclear bits, and syncs.
//  3. Only then their refcounts drop, and only for clusters nothing else references.
// A crash between 2 and 3 leaves leaked clusters, never a reference to a free one.
#include <algorithm>
#include <cassert>

#include "core/log.h"
#include "drivers/qcow2/bitmaps.h"
#include "drivers/qcow2/metadata.h"
#include "drivers/qcow2/ref_counter.h"

namespace imgfs::qcow2 {

namespace {

constexpr uint64_t kMaxBitmapClusters = 1ULL << 22;

bool is_bitmaps(const Extension& e) {
    return e.type == kExtBitmaps;
}

// The rewritten header has a shorter extension list, so serialisation moves the backing name
// up. It goes back where it was: old and new header then differ only in the autoclear field
// and from the dropped extension on, so a torn write can leave the bitmaps named with the bit
// clear (a leak), but never a backing name cut from other bytes.
void keep_backing_name_in_place(const Header& old, Header* h, std::vector<uint8_t>* area) {
    if (h->backing_file.empty() || old.backing_file_offset < h->backing_file_offset ||
        old.backing_file_size != h->backing_file.size()) {
        return;
    }
    area->resize(h->backing_file_offset);
    area->resize(old.backing_file_offset, 0);
    area->insert(area->end(), h->backing_file.begin(), h->backing_file.end());
    h->backing_file_offset = old.backing_file_offset;
    store_be64(area->data() + kOffBackingFileOffset, old.backing_file_offset);
}

std::vector<uint64_t> clusters_to_indexes(const std::vector<uint64_t>& offsets,
                                          uint32_t cluster_bits) {
    std::vector<uint64_t> indexes;
    indexes.reserve(offsets.size());
    for (uint64_t offset : offsets) {
        indexes.push_back(offset >> cluster_bits);
    }
    return indexes;
}

}  // namespace

Task<Result<std::vector<uint64_t>>> Metadata::clear_autoclear_bits() {
    auto ext =
        std::find_if(header_.other_extensions.begin(), header_.other_extensions.end(), is_bitmaps);
    if ((header_.autoclear & kAutoclearBitmaps) == 0 || ext == header_.other_extensions.end()) {
        // Nothing to drop: the bits alone. Memory says what the disk says: a failed write
        // leaves them set in both, so that the next attempt writes them again.
        uint8_t zero[8] = {};
        CO_TRY(co_await write_header_bytes(kOffAutoclearFeatures, ConstBuf(zero, 8)));
        header_.autoclear = 0;
        co_return std::vector<uint64_t>{};
    }
    std::vector<uint8_t> extension = ext->data;  // copied: the header changes across awaits
    std::vector<uint64_t> clusters;
    // Whatever stops the search (a malformed table, or a read that fails, perhaps for good:
    // a bad sector under a bitmap must not keep the image from being written), the bitmaps
    // still go, and what was not found stays allocated.
    if (auto found = co_await find_bitmap_clusters(std::move(extension)); found) {
        clusters = std::move(*found);
    } else if (env_.log != nullptr) {
        env_.log->warn(
            "{}: the persistent bitmaps cannot be followed ({}); their clusters stay "
            "allocated (`qemu-img check -r leaks` frees them)",
            name_, found.error().message());
    }
    // It writes the whole header, feature bits included: none may change meanwhile.
    auto bits_guard = co_await header_bits_lock_.lock();
    Header h = header_;
    h.autoclear = 0;
    std::erase_if(h.other_extensions, is_bitmaps);
    CO_TRY_ASSIGN(std::vector<uint8_t> area, serialize_header(&h));
    keep_backing_name_in_place(header_, &h, &area);
    CO_TRY(co_await write_header_bytes(0, area));  // synced: step 2 is durable before step 3
    header_ = std::move(h);
    if (env_.log != nullptr) {
        env_.log->info("{}: dropped its persistent bitmaps (imgfs does not keep them up to date)",
                       name_);
    }
    co_return clusters;
}

// Step 1. The clusters come out as host offsets, possibly repeated.
Task<Result<std::vector<uint64_t>>> Metadata::find_bitmap_clusters(std::vector<uint8_t> extension) {
    const uint64_t file_size = file_->node()->size();
    const uint64_t cs = g_.cluster_size;
    CO_TRY_ASSIGN(BitmapsExtension ext, parse_bitmaps_extension(extension, g_, file_size));
    std::vector<uint8_t> directory(ext.directory_bytes);
    CO_TRY(co_await file_->read(ext.directory_offset, directory));
    CO_TRY_ASSIGN(std::vector<BitmapTableRef> tables,
                  parse_bitmap_directory(directory, ext, g_, file_size));
    std::vector<uint64_t> clusters;
    append_clusters(ext.directory_offset, ext.directory_bytes, g_, &clusters);
    // Bounds memory whatever the tables say: names past the file's clusters repeat, and real
    // bitmaps are far smaller (a 1 TiB disk tracked at 512 bytes has 4,096 data clusters).
    const uint64_t most = std::min<uint64_t>(file_size / cs + 1, kMaxBitmapClusters);
    std::vector<uint8_t> part(cs);
    for (const BitmapTableRef table : tables) {
        const uint64_t bytes = uint64_t{table.entries} * 8;
        append_clusters(table.offset, bytes, g_, &clusters);
        for (uint64_t at = 0; at < bytes; at += cs) {
            const uint64_t n = std::min(cs, bytes - at);
            CO_TRY(co_await file_->read(table.offset + at, std::span(part.data(), n)));
            CO_TRY(
                collect_bitmap_data_clusters(ConstBuf(part.data(), n), g_, file_size, &clusters));
            if (clusters.size() > most) {
                co_return make_error(EINVAL, "the bitmap tables name more than {} clusters", most);
            }
        }
    }
    co_return clusters;
}

// Step 3. A cluster something else references (a malformed image) is left alone.
Task<Status> Metadata::free_dropped_bitmap_clusters(std::vector<uint64_t> clusters) {
    if (clusters.empty()) {
        co_return Status{};
    }
    assert(std::none_of(header_.other_extensions.begin(), header_.other_extensions.end(),
                        is_bitmaps) &&
           "bitmap clusters are freed only once the header no longer names them");
    std::sort(clusters.begin(), clusters.end());
    clusters.erase(std::unique(clusters.begin(), clusters.end()), clusters.end());
    // Sparse: memory by the number of bitmap clusters, an image of any size. The walk reads
    // each table once, under the metadata lock: bounded by the number of reads, past that the
    // clusters stay allocated.
    RefCounter counter(g_, file_->node()->size(), clusters_to_indexes(clusters, g_.cluster_bits));
    if (Status st = co_await count_references(&counter, options_.bitmap_check_max_tables); !st) {
        if (env_.log != nullptr) {
            env_.log->warn(
                "{}: the {} clusters of the dropped bitmaps stay allocated ({}); "
                "`qemu-img check -r leaks` frees them",
                name_, clusters.size(), st.error().message());
        }
        co_return Status{};
    }
    uint64_t freed = 0;
    for (uint64_t offset : clusters) {
        const uint64_t c = offset >> g_.cluster_bits;
        if (counter.get(c) != 0 || !check_data_range(offset, g_.cluster_size) ||
            !refblock_usable(c / g_.refblock_entries)) {
            continue;  // a table, data or a refcount structure uses it too
        }
        CO_TRY_ASSIGN(uint64_t refcount, co_await get_refcount(c));
        if (refcount != 0) {
            CO_TRY(co_await update_refcount(c, -1, false));
            ++freed;
        }
    }
    if (env_.log != nullptr) {
        env_.log->info("{}: freed {} of the {} clusters the bitmaps used", name_, freed,
                       clusters.size());
    }
    co_return Status{};
}

}  // namespace imgfs::qcow2
