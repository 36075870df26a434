// Metadata: refcounts, the cluster allocator and growth of the refcount structure.
//
// Free clusters inside the image are reused first. New space comes from the end of the image:
// the run, then refcount blocks for every range the run and the blocks themselves reach that
// has none yet (counted in those new blocks), written and synced before the table points at
// them. The refcount table grows the same way: a bigger copy past the end, with blocks for its
// own range, switched to by one header write.
#include <algorithm>
#include <cassert>

#include "core/log.h"
#include "drivers/qcow2/metadata.h"
#include "drivers/qcow2/ref_counter.h"

namespace imgfs::qcow2 {

Task<Result<uint64_t>> Metadata::get_refcount(uint64_t cluster) {
    uint64_t ri = cluster / g_.refblock_entries;
    if (ri >= refcount_table_.size()) {
        co_return uint64_t{0};
    }
    uint64_t entry = refcount_table_[ri];
    uint64_t block = entry & ~kRefTableReservedMask;
    if (block == 0) {
        co_return uint64_t{0};
    }
    if ((entry & kRefTableReservedMask) != 0 || (block & (g_.cluster_size - 1)) != 0 ||
        !cluster_in_file(block)) {
        co_return co_await corruption(fmt::format(
            "refcount table entry {} ({:#x}) is invalid or beyond the end of the file", ri, entry));
    }
    if (const std::string* what = refblock_overlap(ri, block)) {
        co_return co_await corruption(fmt::format(
            "refcount table entry {}: the block at {:#x} lies on {}", ri, block, *what));
    }
    CO_TRY_ASSIGN(TableCache::Ref ref, co_await refblock_cache_.get(file_, block));
    co_return load_refcount(g_, ref.data(), cluster % g_.refblock_entries);
}

Task<Status> Metadata::update_refcount(uint64_t cluster, int64_t delta, bool punch_if_freed,
                                       Reuse reuse) {
    if (lazy_refcounts_ && !dirty_bit_set_) {
        CO_TRY(co_await mark_dirty_for_lazy_refcounts());
    }
    uint64_t ri = cluster / g_.refblock_entries;
    uint64_t block = ri < refcount_table_.size() ? refcount_table_[ri] & ~kRefTableReservedMask : 0;
    if (block == 0) {
        co_return co_await corruption(
            fmt::format("cluster {:#x} has no refcount block", cluster << g_.cluster_bits));
    }
    CO_TRY_ASSIGN(uint64_t old, co_await get_refcount(cluster));  // validates the block
    CO_TRY_ASSIGN(TableCache::Ref ref, co_await refblock_cache_.get(file_, block));
    uint64_t updated = old + static_cast<uint64_t>(delta);
    if ((delta < 0 && old < static_cast<uint64_t>(-delta)) ||
        (delta > 0 && (updated < old || updated > g_.refcount_max))) {
        const char* where = delta < 0 ? "below 0" : "beyond its maximum";
        co_return co_await corruption(fmt::format("refcount of cluster {:#x} would go from {} {}",
                                                  cluster << g_.cluster_bits, old, where));
    }
    store_refcount(g_, ref.data(), cluster % g_.refblock_entries, updated);
    refblock_cache_.mark_dirty(ref);
    if (updated == 0) {
        release_to_allocator(cluster);
        const bool was_metadata = metadata_clusters_.erase(cluster);
        // A freed L2 table must not come back out of the cache when its cluster is reused
        // (a new table there would start as the old one's mappings). Only tables: a forget
        // sends lookups waiting for a table read back to the L1 table.
        if (was_metadata || l2_cache_.contains(cluster << g_.cluster_bits)) {
            l2_cache_.forget(cluster << g_.cluster_bits);
        }
        if (lazy_refcounts_ || reuse == Reuse::kAfterTablesDurable) {
            freed_unflushed_.insert(cluster);
        }
        if (!reads_in_flight_.empty()) {
            freed_under_reads_[cluster] = read_seq_;
            freed_under_reads_order_.emplace_back(read_seq_, cluster);
        }
        if (punch_if_freed) {
            to_punch_.push_back(cluster);
        }
    }
    co_return Status{};
}

void Metadata::end_data_read(uint64_t ticket) {
    reads_in_flight_.erase(ticket);
    const uint64_t oldest = reads_in_flight_.empty() ? UINT64_MAX : *reads_in_flight_.begin();
    // Entries whose ticket is below the oldest read still running are released. Those held
    // back for another reason as well are released by that (tables_durable, punch_freed): the
    // hint goes back only to clusters that are free now, else every later allocation would
    // walk the held ones again.
    while (!freed_under_reads_order_.empty() && freed_under_reads_order_.front().first < oldest) {
        const auto [seq, cluster] = freed_under_reads_order_.front();
        freed_under_reads_order_.pop_front();
        auto it = freed_under_reads_.find(cluster);
        if (it == freed_under_reads_.end() || it->second != seq) {
            continue;
        }
        freed_under_reads_.erase(it);
        if (freed_unflushed_.count(cluster) == 0 && punching_.count(cluster) == 0) {
            release_to_allocator(cluster);
        }
    }
}

bool Metadata::held_for_reads(uint64_t cluster) {
    auto it = freed_under_reads_.find(cluster);
    if (it == freed_under_reads_.end()) {
        return false;
    }
    if (!reads_in_flight_.empty() && *reads_in_flight_.begin() <= it->second) {
        return true;  // a read that may have mapped it before it was freed is still running
    }
    freed_under_reads_.erase(it);
    return false;
}

Task<Result<HostRun>> Metadata::alloc_clusters(uint64_t count, bool exact) {
    assert(count > 0);
    const uint64_t entries = g_.refblock_entries;
    released_low_ = UINT64_MAX;  // see release_to_allocator
    const uint64_t hint = free_hint_;
    uint64_t start = hint;
    uint64_t idx = hint;
    // Lowest cluster the scan saw that is free: the next scan starts there. From the hint up
    // to it, all are in use or held back. Held-back clusters (a punch or a flush to wait for,
    // reads that may still see them) do not keep the hint: counted as free, every allocation
    // walked all of them again until the next flush (millions after a large trim). Whoever
    // releases them lowers the hint instead (tables_durable, punch_freed, end_data_read).
    uint64_t first_free = UINT64_MAX;
    // Free clusters inside the image first; what cannot be found there comes from the end.
    // Not past the file's end and a margin: a damaged refcount table can claim clusters far
    // out (2^35 of them in one block read many times), and scanning those would never end.
    const uint64_t file_clusters = (file_->node()->size() + g_.cluster_size - 1) >> g_.cluster_bits;
    const uint64_t scan_end = std::min(end_cluster_, file_clusters + kMaxClustersPastEof);
    while (idx < scan_end && idx - start < count) {
        ++clusters_scanned_;
        uint64_t ri = idx / entries;
        if (ri >= refcount_table_.size() || (refcount_table_[ri] & ~kRefTableReservedMask) == 0) {
            // A range without a refcount block holds nothing of ours; it is not reused here
            // (there is no block to count in), so skip it.
            start = idx = (ri + 1) * entries;
            continue;
        }
        bool pending =
            punching_.count(idx) != 0 || freed_unflushed_.count(idx) != 0 || held_for_reads(idx);
        // Metadata with refcount 0 (a damaged image) is not free either: handing it out
        // would put data over a table.
        bool used = pending || over_referenced_.count(idx) != 0 ||
                    metadata_clusters_.first_in(idx, 1).has_value();
        if (!used) {
            CO_TRY_ASSIGN(uint64_t rc, co_await get_refcount(idx));
            used = rc != 0;
        }
        if (!used) {
            first_free = std::min(first_free, idx);
        }
        if (!used) {
            ++idx;
            continue;
        }
        if (!exact && idx > start) {
            break;  // a shorter run will do
        }
        start = idx = idx + 1;
    }
    uint64_t got = std::min(idx - start, count);
    if (got == 0 || (exact && got < count)) {
        // Nothing from the hint up to first_free (or the end) is free: don't scan it again.
        free_hint_ = std::min({first_free, idx, released_low_});
        co_return co_await alloc_at_end(count);
    }
    CO_TRY(check_host_end(start + got));
    // A skipped shorter run (exact mode) stays findable.
    free_hint_ = std::min(first_free < start ? first_free : start + got, released_low_);
    for (uint64_t c = start; c < start + got; ++c) {
        if (Status st = co_await update_refcount(c, 1, false); !st) {
            // The clusters counted so far leak; the rest of the run is still free.
            release_to_allocator(c);
            co_return std::move(st).error();
        }
    }
    co_return HostRun{start << g_.cluster_bits, got};
}

// Host offsets are 56 bits in L1 and L2 entries. Past that, an offset would not fit, and the
// shift would wrap onto the header: a damaged refcount table can move the end that far.
Status Metadata::check_host_end(uint64_t end_cluster) const {
    const uint64_t limit = kMaxHostEnd >> g_.cluster_bits;
    if (end_cluster > limit) {
        return make_error(EFBIG,
                          "{}: no room for new clusters: the image would end past 2^56 bytes "
                          "(its refcounts claim clusters up to {})",
                          name_, end_cluster_);
    }
    return Status{};
}

std::vector<uint64_t> Metadata::ranges_without_block(uint64_t start, uint64_t clusters) const {
    const uint64_t entries = g_.refblock_entries;
    std::vector<uint64_t> ranges;
    // Placing the blocks can reach into one more range, which needs a block too: iterate to a
    // fixed point (the set only grows, so equal sizes mean equal sets).
    for (;;) {
        const uint64_t end = start + clusters + ranges.size();
        std::vector<uint64_t> need;
        for (uint64_t r = start / entries; r <= (end - 1) / entries; ++r) {
            if (r >= refcount_table_.size() || (refcount_table_[r] & ~kRefTableReservedMask) == 0) {
                need.push_back(r);
            }
        }
        if (need.size() == ranges.size()) {
            return ranges;
        }
        ranges = std::move(need);
    }
}

Task<Result<HostRun>> Metadata::alloc_at_end(uint64_t count) {
    const uint64_t cs = g_.cluster_size;
    const uint64_t entries = g_.refblock_entries;
    uint64_t base = 0;
    std::vector<uint64_t> new_ranges;  // ranges that get a new block, placed after the run
    for (;;) {
        base = end_cluster_;
        // (Before the table grows for it: a damaged table can put the end near 2^64.)
        CO_TRY(check_host_end(base + count + 1));
        new_ranges = ranges_without_block(base, count);
        uint64_t last_range = (base + count + new_ranges.size() - 1) / entries;
        if (last_range < refcount_table_.size()) {
            break;
        }
        CO_TRY(co_await grow_refcount_table(last_range + 1));  // moves end_cluster_: again
    }
    const uint64_t blocks_start = base + count;
    const uint64_t area_end = blocks_start + new_ranges.size();
    CO_TRY(check_host_end(area_end));
    // Claimed before any I/O: if a step below fails, the area is leaked (never handed out or
    // counted twice by a retry), which is the safe direction.
    end_cluster_ = area_end;
    AlignedBuffer blocks = AlignedBuffer::zeroed(std::max<size_t>(new_ranges.size(), 1) * cs);
    std::vector<uint64_t> counted_elsewhere;
    for (uint64_t c = base; c < area_end; ++c) {
        auto it = std::find(new_ranges.begin(), new_ranges.end(), c / entries);
        if (it != new_ranges.end()) {
            size_t j = static_cast<size_t>(it - new_ranges.begin());
            store_refcount(g_, blocks.data() + j * cs, c % entries, 1);
        } else {
            counted_elsewhere.push_back(c);  // an existing block covers it
        }
    }
    if (!new_ranges.empty()) {
        // New blocks durable before the table points at them.
        file_->event(IoEvent::kRefblockAlloc);
        CO_TRY(co_await file_->write(blocks_start << g_.cluster_bits,
                                     ConstBuf(blocks.data(), new_ranges.size() * cs)));
        CO_TRY(co_await sync());
        // A block's own refcount lives in the block of the range it lands in. That is a later
        // new range (blocks go after the run), or a range that has a block already, when a
        // range before it had none. The latter count goes to disk first, durably, before any
        // table entry names the new block (refcount before reference, for refcount blocks).
        bool counted_a_block = false;
        for (uint64_t c : counted_elsewhere) {
            if (c >= blocks_start) {
                CO_TRY(co_await update_refcount(c, 1, false));
                counted_a_block = true;
            }
        }
        if (counted_a_block) {
            CO_TRY(co_await write_back_refcounts());
            CO_TRY(co_await sync());
        }
        // Among the new ranges, the table points at the later one first, durably, so a crash
        // between entries leaves a leak, never a referenced block with refcount 0.
        for (size_t j = new_ranges.size(); j-- > 0;) {
            if (j + 1 < new_ranges.size()) {
                CO_TRY(co_await sync());
            }
            refcount_table_[new_ranges[j]] = (blocks_start + j) << g_.cluster_bits;
            Status st = co_await write_refcount_table_entry(new_ranges[j]);
            if (!st) {
                refcount_table_[new_ranges[j]] = 0;  // as on disk
                co_return std::move(st).error();
            }
            metadata_clusters_.insert(blocks_start + j);
        }
        // A range that had no block was skipped by the allocator's scans, and may hold free
        // clusters below the run (an earlier allocation that failed after claiming them):
        // counted now, they can be handed out.
        release_to_allocator(*std::min_element(new_ranges.begin(), new_ranges.end()) * entries);
    }
    for (uint64_t c : counted_elsewhere) {
        if (c < blocks_start) {  // the new blocks were counted above
            CO_TRY(co_await update_refcount(c, 1, false));
        }
    }
    co_return HostRun{base << g_.cluster_bits, count};
}

Task<Status> Metadata::free_clusters(uint64_t host_offset, uint64_t count, bool punch) {
    uint64_t first = host_offset >> g_.cluster_bits;
    for (uint64_t c = first; c < first + count; ++c) {
        CO_TRY(co_await update_refcount(c, -1, punch));
    }
    co_return Status{};
}

// Nothing references the clusters (never linked), so no ordering applies. The caller reports
// its own error; if giving them back fails too they leak (a repair reclaims them).
Task<void> Metadata::give_back_clusters(uint64_t host_offset, uint64_t count) {
    Status st = co_await free_clusters(host_offset, count, false);
    if (!st && env_.log != nullptr) {
        env_.log->warn("{}: {} cluster(s) at {:#x} of a failed allocation leak: {}", name_, count,
                       host_offset, st.error().message());
    }
}

// The entry was changed in a cached table only: its clusters are reused once that is durable.
Task<Status> Metadata::free_entry_clusters(L2Entry e, bool punch) {
    if (e.compressed()) {
        CompressedRef c = decode_compressed(g_, e.word);
        uint64_t first = 0;
        uint64_t last = 0;
        compressed_clusters(g_, c, &first, &last);
        for (uint64_t i = first; i <= last; ++i) {
            // Compressed clusters share host clusters; a shared one is never punched.
            CO_TRY(co_await update_refcount(i, -1, false, Reuse::kAfterTablesDurable));
        }
        co_return Status{};
    }
    if (e.host_offset() != 0) {
        co_return co_await update_refcount(e.host_offset() >> g_.cluster_bits, -1, punch,
                                           Reuse::kAfterTablesDurable);
    }
    co_return Status{};
}

Task<Status> Metadata::write_refcount_table_entry(uint64_t index) {
    CO_TRY(table_switch_settled(unsettled_refcount_table_));
    uint8_t be[8];
    store_be64(be, refcount_table_[index]);
    file_->event(IoEvent::kRefblockAlloc);
    co_return co_await file_->write(header_.refcount_table_offset + index * 8, ConstBuf(be, 8));
}

Status Metadata::table_switch_settled(const std::string& unsettled) const {
    if (!unsettled.empty()) {
        return make_error(EIO, "{}: {}", name_, unsettled);
    }
    return {};
}

Error Metadata::unsettled_table_switch(std::string* unsettled, const char* table, Error error) {
    // A header write that failed may still have reached the disk, which would then point at
    // the new table while this node keeps writing entries into the old one, which nothing
    // references: links made from then on would be lost. Until a switch of the same kind
    // succeeds (or a reopen reads the header again) no entry of that table is written;
    // everything else (reads, writes into existing clusters, write-back of cached tables)
    // goes on.
    *unsettled = fmt::format(
        "switching to a new {} table failed ({}), so which table the image uses is unknown "
        "until a switch succeeds or the image is opened again; writes that need a new entry in "
        "it are refused",
        table, error.message());
    if (env_.log != nullptr) {
        env_.log->error("{}: {}", name_, *unsettled);
    }
    return error;
}

Task<Status> Metadata::grow_refcount_table(uint64_t min_entries) {
    const uint64_t cs = g_.cluster_size;
    const uint64_t per_cluster = cs / 8;
    const uint64_t entries = g_.refblock_entries;
    // Doubled, but never past the largest table: a table of an odd size (QEMU's, or one a
    // repair sized exactly) over half the limit could otherwise never grow again.
    uint64_t new_entries = std::max<uint64_t>(
        min_entries, std::min<uint64_t>(refcount_table_.size() * 2, kMaxRefcountTableBytes / 8));
    uint64_t start = end_cluster_;
    uint64_t table_clusters = 0;
    std::vector<uint64_t> new_ranges;  // ranges that get a new self-describing block
    for (;;) {
        new_entries = (new_entries + per_cluster - 1) / per_cluster * per_cluster;
        table_clusters = new_entries / per_cluster;
        // Blocks needed for the ranges the new table and blocks land in.
        new_ranges = ranges_without_block(start, table_clusters);
        uint64_t last_range = (start + table_clusters + new_ranges.size() - 1) / entries;
        if (last_range < new_entries && uint64_t{table_clusters} * cs <= kMaxRefcountTableBytes) {
            break;
        }
        if (uint64_t{table_clusters} * cs > kMaxRefcountTableBytes) {
            co_return make_error(EFBIG, "{}: the refcount table would exceed {} bytes", name_,
                                 kMaxRefcountTableBytes);
        }
        new_entries = last_range + 1;
    }
    const uint64_t blocks_start = start + table_clusters;
    const uint64_t area_end = blocks_start + new_ranges.size();
    // Claimed before any I/O (see alloc_at_end): a failure leaks the area, a retry goes past it.
    end_cluster_ = area_end;
    std::vector<uint64_t> table(new_entries, 0);
    std::copy(refcount_table_.begin(), refcount_table_.end(), table.begin());
    AlignedBuffer blocks = AlignedBuffer::zeroed(std::max<uint64_t>(new_ranges.size(), 1) * cs);
    for (size_t j = 0; j < new_ranges.size(); ++j) {
        table[new_ranges[j]] = (blocks_start + j) << g_.cluster_bits;
    }
    for (uint64_t c = start; c < area_end; ++c) {
        auto it = std::find(new_ranges.begin(), new_ranges.end(), c / entries);
        if (it != new_ranges.end()) {
            size_t j = static_cast<size_t>(it - new_ranges.begin());
            store_refcount(g_, blocks.data() + j * cs, c % entries, 1);
        } else {
            CO_TRY(co_await update_refcount(c, 1, false));  // an existing block covers it
        }
    }
    // New blocks and table, and the counts for them in existing blocks, all durable...
    file_->event(IoEvent::kRefTableGrow);
    if (!new_ranges.empty()) {
        CO_TRY(co_await file_->write(blocks_start << g_.cluster_bits,
                                     ConstBuf(blocks.data(), new_ranges.size() * cs)));
    }
    AlignedBuffer table_buf = AlignedBuffer::zeroed(table_clusters * cs);
    for (size_t i = 0; i < table.size(); ++i) {
        store_be64(table_buf.data() + i * 8, table[i]);
    }
    CO_TRY(co_await file_->write(start << g_.cluster_bits, table_buf.span()));
    CO_TRY(co_await write_back_refcounts());
    CO_TRY(co_await sync());
    // ...before one header write switches to them.
    // refcount_table_offset and refcount_table_clusters, one write.
    uint8_t fields[kOffRefcountTableClusters + 4 - kOffRefcountTableOffset];
    store_be64(fields, start << g_.cluster_bits);
    store_be32(fields + (kOffRefcountTableClusters - kOffRefcountTableOffset),
               static_cast<uint32_t>(table_clusters));
    if (Status switched =
            co_await write_header_bytes(kOffRefcountTableOffset, ConstBuf(fields, sizeof(fields)));
        !switched) {
        co_return unsettled_table_switch(&unsettled_refcount_table_, "refcount",
                                         std::move(switched).error());
    }
    unsettled_refcount_table_.clear();  // the header names this table now, whatever came before
    uint64_t old_offset = header_.refcount_table_offset;
    uint64_t old_clusters = header_.refcount_table_clusters;
    header_.refcount_table_offset = start << g_.cluster_bits;
    header_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
    refcount_table_ = std::move(table);
    end_cluster_ = std::max(end_cluster_, area_end);
    metadata_clusters_.insert(start, area_end - start);
    if (!new_ranges.empty()) {
        // As in alloc_at_end: free clusters of a range that had no block are reusable now.
        release_to_allocator(*std::min_element(new_ranges.begin(), new_ranges.end()) * entries);
    }
    // The old table is referenced by nothing now. The table has grown whatever happens to
    // it: a failure to free it leaks its clusters, and is not the growth's failure.
    if (Status freed = co_await free_clusters(old_offset, old_clusters, false);
        !freed && env_.log != nullptr) {
        env_.log->warn("{}: the old refcount table at {} stays allocated (leaked): {}", name_,
                       old_offset, freed.error().message());
    }
    co_return Status{};
}

}  // namespace imgfs::qcow2
