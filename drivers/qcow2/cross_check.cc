// Metadata: open-time checks of a writable image, and the per-extent data checks they feed.
//
// Two kinds of damage are invisible to a reader of one table entry, yet make a writer lose data:
//  - A data cluster past the end of the file. After a crash that is legitimate (the refcount and
//    the L2 entry reached the disk, the data did not; it reads as zeros), but only if its
//    refcount says the cluster is allocated. With refcount 0 the entry is corrupt, and the
//    allocator would hand the cluster out a second time.
//  - A cluster referenced more often than its refcount says (two L2 entries on one cluster with
//    refcount 1). A write in place through either entry would change the other's data.
// So a read-write open places the allocation end past every allocated cluster, and counts the
// references of the tables against the stored refcounts (bounded in time and memory; larger
// images skip it, saying so). Writes into an over-referenced cluster, and data past the end of
// the file with refcount 0, are reported as corruption.
#include <cstring>
#include <optional>
#include <unordered_set>

#include "core/log.h"
#include "drivers/qcow2/metadata.h"
#include "drivers/qcow2/ref_counter.h"

namespace imgfs::qcow2 {

namespace {
// The index of the last non-zero byte of `bytes` (a refcount block), if any. Word by word:
// the search for the allocation end reads blocks of a sparse file that are all zeros.
std::optional<size_t> last_nonzero_byte(ConstBuf bytes) {
    size_t end = bytes.size();
    while (end >= 8) {
        uint64_t word = 0;
        std::memcpy(&word, bytes.data() + end - 8, 8);
        if (word != 0) {
            break;
        }
        end -= 8;
    }
    while (end > 0 && bytes[end - 1] == 0) {
        --end;
    }
    return end == 0 ? std::nullopt : std::optional<size_t>(end - 1);
}

// The cross-check reads every L2 table and keeps 4 bytes per host cluster: bound both.
constexpr uint64_t kCrossCheckMaxTableBytes = 64ULL << 20;
constexpr uint64_t kCrossCheckMaxClusters = 1ULL << 22;
}  // namespace

bool Metadata::refblock_usable(uint64_t ri) const {
    if (ri >= refcount_table_.size()) {
        return false;
    }
    uint64_t entry = refcount_table_[ri];
    uint64_t block = entry & ~kRefTableReservedMask;
    return block != 0 && (entry & kRefTableReservedMask) == 0 &&
           (block & (g_.cluster_size - 1)) == 0 && cluster_in_file(block) &&
           refblock_overlap(ri, block) == nullptr;
}

Task<Status> Metadata::find_allocation_end() {
    const uint64_t entries = g_.refblock_entries;
    uint64_t end = (file_->node()->size() + g_.cluster_size - 1) >> g_.cluster_bits;
    // Every block is read once, and its counts decoded only up to its last non-zero byte: a
    // crafted table whose entries all name one all-zero block had that block decoded in full
    // for each of them, with no await in between (35 s of a stalled loop for a 320 KiB image;
    // hours for a larger table), and distinct all-zero blocks in a sparse file cost the same.
    // The work is now a comparison of the file's bytes at most. Not bounded by a margin past
    // the end of the file: after a crash an L2 entry may name a cluster past it (data that
    // never reached the disk, read as zeros), however far, and the end must lie beyond it.
    std::unordered_set<uint64_t> scanned;
    for (uint64_t ri = refcount_table_.size(); ri-- > 0;) {
        if ((ri + 1) * entries <= end) {
            break;  // lower blocks cover nothing past `end`
        }
        if (!refblock_usable(ri)) {
            continue;  // a broken entry is reported when an allocation reaches it
        }
        const uint64_t offset = refcount_table_[ri] & ~kRefTableReservedMask;
        if (!scanned.insert(offset).second) {
            continue;  // all zeros where a higher entry scanned it: the same here
        }
        // One block read, scanned in memory (a block of 2 MiB clusters counts 1M of them).
        CO_TRY_ASSIGN(TableCache::Ref block, co_await refblock_cache_.get(file_, offset));
        const std::optional<size_t> last_byte =
            last_nonzero_byte(ConstBuf(block.data(), g_.cluster_size));
        if (!last_byte) {
            continue;
        }
        // The highest entry with a bit in that byte.
        const uint64_t last_entry = ((*last_byte + 1) * 8 - 1) / g_.refcount_bits;
        for (uint64_t c = ri * entries + last_entry + 1; c-- > std::max(ri * entries, end);) {
            if (load_refcount(g_, block.data(), c % entries) != 0) {
                end_cluster_ = std::max(end_cluster_, c + 1);
                co_return Status{};
            }
        }
    }
    co_return Status{};
}

bool Metadata::references_countable() const {
    uint64_t tables = 0;
    for (uint64_t e : l1_) {
        tables += (e & kOffsetMask) != 0 ? 1 : 0;
    }
    for (const SnapshotEntry& s : snapshots_.entries) {
        tables += s.l1_size;
    }
    return tables * g_.cluster_size <= kCrossCheckMaxTableBytes &&
           end_cluster_ <= kCrossCheckMaxClusters;
}

Task<Status> Metadata::cross_check_references() {
    over_referenced_.clear();
    if (!references_countable()) {
        if (env_.log != nullptr) {
            env_.log->info("{}: large image; skipping the reference cross-check at open", name_);
        }
        co_return Status{};
    }
    RefCounter counter(g_, file_->node()->size());
    if (Status st = co_await count_references(&counter); !st) {
        // A broken table: the requests that reach it get EIO and report it.
        if (env_.log != nullptr) {
            env_.log->warn("{}: reference cross-check stopped: {}", name_, st.error().message());
        }
        co_return Status{};
    }
    for (uint64_t c = 0; c < counter.clusters(); ++c) {
        uint64_t refs = counter.get(c);
        if (refs == 0 || !refblock_usable(c / g_.refblock_entries)) {
            continue;
        }
        CO_TRY_ASSIGN(uint64_t rc, co_await get_refcount(c));
        if (refs > rc) {
            over_referenced_.emplace(c, OverReference{refs, rc});
            // Never handed out by the allocator at the end (nor inside: alloc_clusters).
            end_cluster_ = std::max(end_cluster_, c + 1);
        }
    }
    if (!over_referenced_.empty() && env_.log != nullptr) {
        env_.log->warn(
            "{}: {} clusters are referenced more often than their refcount says "
            "(qemu-img check -r all repairs it); writes to them will fail",
            name_, over_referenced_.size());
    }
    co_return Status{};
}

std::string Metadata::free_problem(const L2Entry& e) const {
    uint64_t first = 0;
    uint64_t last = 0;
    if (e.compressed()) {
        compressed_clusters(g_, decode_compressed(g_, e.word), &first, &last);
    } else if (e.host_offset() != 0) {
        first = last = e.host_offset() >> g_.cluster_bits;
    } else {
        return {};
    }
    if (std::optional<uint64_t> c = metadata_clusters_.first_in(first, last - first + 1)) {
        return fmt::format("it names host cluster {:#x}, which holds metadata",
                           *c << g_.cluster_bits);
    }
    for (uint64_t c = first; !e.compressed() && c <= last; ++c) {
        if (auto it = over_referenced_.find(c); it != over_referenced_.end()) {
            return fmt::format("host cluster {:#x} has {} references but refcount {}",
                               c << g_.cluster_bits, it->second.references, it->second.refcount);
        }
    }
    return {};
}

Task<Result<std::string>> Metadata::data_extent_problem(uint64_t host_offset, uint64_t bytes,
                                                        bool for_write) {
    if (Status overlap = check_data_range(host_offset, bytes); !overlap) {
        co_return std::move(overlap).error().context;
    }
    const uint64_t cs = g_.cluster_size;
    const uint64_t file_size = file_->node()->size();
    // With the dirty bit set (lazy refcounts, not repaired: a read-only open) a new cluster's
    // count may never have reached the disk, so a count of 0 proves nothing. A read past the
    // end of the file reads zeros whatever the count; only a write needs it right, and a
    // writable open repairs the counts first.
    const bool counts_trusted = (header_.incompatible & kIncompatDirty) == 0;
    for (uint64_t c = std::max(host_offset, file_size) / cs;
         (counts_trusted || for_write) && c * cs < host_offset + bytes; ++c) {
        uint64_t rc = 0;
        if (refblock_usable(c / g_.refblock_entries)) {
            // A failed read of the refcount block is an I/O error, not a finding: passed on
            // as it is, so that it never marks the image corrupt.
            CO_TRY_ASSIGN(rc, co_await get_refcount(c));
        }
        if (rc == 0) {
            co_return fmt::format(
                "data cluster at host offset {:#x} is beyond the end of the file ({:#x}) and "
                "not allocated",
                c * cs, file_size);
        }
    }
    // Reads through either reference see the same (shared) data; only writes do harm.
    for (uint64_t c = host_offset / cs;
         for_write && !over_referenced_.empty() && c * cs < host_offset + bytes; ++c) {
        auto it = over_referenced_.find(c);
        if (it != over_referenced_.end()) {
            co_return fmt::format("host cluster {:#x} has {} references but refcount {}", c * cs,
                                  it->second.references, it->second.refcount);
        }
    }
    co_return std::string();
}

}  // namespace imgfs::qcow2
