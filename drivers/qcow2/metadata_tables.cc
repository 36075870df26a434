// Metadata: the L1 table and access to L2 tables (allocation, and copy-on-write of L2 tables
// shared with internal snapshots).
#include <cstring>

#include "core/log.h"
#include "drivers/qcow2/metadata.h"

namespace imgfs::qcow2 {

Status Metadata::check_l1_entry(uint64_t l1_index, uint64_t entry) {
    uint64_t off = entry & kOffsetMask;
    if ((entry & kL1ReservedMask) != 0) {
        return make_error(EIO, "L1 entry {} ({:#x}) has reserved bits set", l1_index, entry);
    }
    if ((off & (g_.cluster_size - 1)) != 0) {
        return make_error(EIO, "L1 entry {}: L2 table offset {:#x} is not cluster aligned",
                          l1_index, off);
    }
    if (off + g_.cluster_size > file_->node()->size()) {
        return make_error(EIO, "L1 entry {}: L2 table at {:#x} is beyond the end of the file",
                          l1_index, off);
    }
    if (off < g_.cluster_size) {
        return make_error(EIO, "L1 entry {}: L2 table at {:#x} overlaps the header", l1_index, off);
    }
    if (auto it = l2_overlaps_.find(l1_index);
        it != l2_overlaps_.end() && it->second.first == off) {
        return make_error(EIO, "L1 entry {}: L2 table at {:#x} lies on {}", l1_index, off,
                          it->second.second);
    }
    return {};
}

Task<Result<TableCache::Ref>> Metadata::l2_for_read(uint64_t l1_index) {
    // Without the lock: a write may move this table (copy it and free the old one) while we
    // wait for another reader's read of it. Then the L1 entry is read again.
    for (int attempt = 0;; ++attempt) {
        Result<TableCache::Ref> ref = co_await l2_for_read_once(l1_index);
        if (ref || ref.error().errnum != TableCache::kStale || attempt >= 8) {
            co_return ref;
        }
    }
}

Task<Result<TableCache::Ref>> Metadata::l2_for_read_once(uint64_t l1_index) {
    if (l1_index >= l1_.size()) {
        co_return TableCache::Ref();
    }
    uint64_t entry = l1_[l1_index];
    uint64_t off = entry & kOffsetMask;
    if (off == 0) {
        if ((entry & kL1ReservedMask) != 0) {
            co_return co_await corruption(
                fmt::format("L1 entry {} ({:#x}) has reserved bits set", l1_index, entry));
        }
        co_return TableCache::Ref();
    }
    if (TableCache::Ref ref = l2_cache_.lookup(off)) {
        co_return ref;  // the hot path: no checks needed for a table already validated
    }
    if (Status st = check_l1_entry(l1_index, entry); !st) {
        co_return co_await corruption(st.error().context);
    }
    co_return co_await l2_cache_.get(file_, off);
}

Task<Status> Metadata::write_l1_entry(uint64_t l1_index) {
    CO_TRY(table_switch_settled(unsettled_l1_));
    uint8_t be[8];
    store_be64(be, l1_[l1_index]);
    file_->event(IoEvent::kL1);
    co_return co_await file_->write(header_.l1_table_offset + l1_index * 8, ConstBuf(be, 8));
}

Task<Result<TableCache::Ref>> Metadata::allocate_l2(uint64_t l1_index) {
    // Refused before anything is allocated: write_l1_entry would refuse the switch anyway,
    // and every refused write leaked its new table.
    CO_TRY(table_switch_settled(unsettled_l1_));
    CO_TRY_ASSIGN(HostRun run, co_await alloc_clusters(1, true));
    const uint64_t host = run.offset;
    CO_TRY(co_await write_new_l2(host, nullptr));
    CO_TRY(co_await switch_l1_entry(l1_index, host | kOflagCopied));
    metadata_clusters_.insert(host >> g_.cluster_bits);
    co_return co_await l2_cache_.get(file_, host);
}

// The new table at `host` (zeros, or `content`) and its refcount must be durable before the
// L1 entry points at it. Until then nothing names the cluster: a failure gives it back (a
// full disk failing every allocating write leaked one table per write before).
Task<Status> Metadata::write_new_l2(uint64_t host, const AlignedBuffer* content) {
    file_->event(IoEvent::kL2Alloc);
    Status st;
    if (content == nullptr) {
        st = co_await file_->write_zeroes(host, g_.cluster_size, false);
    } else {
        st = co_await file_->write(host, content->span());
    }
    if (st && !lazy_refcounts_) {
        st = co_await write_back_refcounts();
    }
    if (st) {
        st = co_await sync();
    }
    if (!st) {
        co_await give_back_clusters(host, 1);
    }
    co_return st;
}

Task<Status> Metadata::switch_l1_entry(uint64_t l1_index, uint64_t entry) {
    const uint64_t old = l1_[l1_index];
    l1_[l1_index] = entry;
    Status st = co_await write_l1_entry(l1_index);
    if (!st) {
        // The entry on disk may still be the old one: so must ours be, or a retry would put
        // data into a table that only this cache knows (lost at close). The new table leaks.
        l1_[l1_index] = old;
    }
    co_return st;
}

Task<Result<TableCache::Ref>> Metadata::copy_shared_l2(uint64_t l1_index) {
    CO_TRY(table_switch_settled(unsettled_l1_));  // as in allocate_l2
    uint64_t old = l1_[l1_index] & kOffsetMask;
    CO_TRY_ASSIGN(TableCache::Ref old_ref, co_await l2_cache_.get(file_, old));
    CO_TRY_ASSIGN(HostRun run, co_await alloc_clusters(1, true));
    const uint64_t host = run.offset;
    // The data clusters it references keep their counts: the snapshot's table still references
    // them, and now ours does too instead of sharing one table.
    AlignedBuffer copy(g_.cluster_size);
    std::memcpy(copy.data(), old_ref.data(), g_.cluster_size);
    old_ref.reset();
    CO_TRY(co_await write_new_l2(host, &copy));
    CO_TRY(co_await switch_l1_entry(l1_index, host | kOflagCopied));
    // Indexed as soon as the L1 names it, as allocate_l2 does: the table serves writes from
    // now on even if the sync below fails.
    metadata_clusters_.insert(host >> g_.cluster_bits);
    CO_TRY(co_await sync());
    // The active L1 no longer references the old table (durable above).
    CO_TRY(co_await update_refcount(old >> g_.cluster_bits, -1, false));
    co_return co_await l2_cache_.get(file_, host);
}

Task<Result<TableCache::Ref>> Metadata::l2_for_write(uint64_t l1_index) {
    if (l1_index >= l1_.size()) {
        co_return make_error(EINVAL, "{}: guest offset beyond the L1 table", name_);
    }
    uint64_t entry = l1_[l1_index];
    uint64_t off = entry & kOffsetMask;
    if (off == 0) {
        co_return co_await allocate_l2(l1_index);
    }
    if (Status st = check_l1_entry(l1_index, entry); !st) {
        co_return co_await corruption(st.error().context);
    }
    if (auto it = l2_named_twice_.find(l1_index);
        it != l2_named_twice_.end() && it->second == off) {
        // The entries that still name the table now (one of them may have been given a copy
        // since the index was made, and there may be more than one other).
        uint64_t others = 0;
        uint64_t other = 0;
        for (uint64_t j = 0; j < l1_.size(); ++j) {
            if (j != l1_index && (l1_[j] & kOffsetMask) == off) {
                ++others;
                other = j;
            }
        }
        // In place, the write would change the other entries' ranges too. A copy is fine while
        // the table's count covers them all: the count drops by one, and the table stays.
        bool refuse = others != 0 && (entry & kOflagCopied) != 0;
        if (others != 0 && !refuse) {
            CO_TRY_ASSIGN(uint64_t count, co_await get_refcount(off >> g_.cluster_bits));
            refuse = count < others + 1;
        }
        if (refuse) {
            co_return co_await corruption(
                fmt::format("L1 entry {}: its L2 table at {:#x} is the L2 table of L1 entry {} too",
                            l1_index, off, other));
        }
    }
    if ((entry & kOflagCopied) == 0) {
        co_return co_await copy_shared_l2(l1_index);
    }
    co_return co_await l2_cache_.get(file_, off);
}

Status Metadata::check_new_size(uint64_t new_size) const {
    if (new_size < header_.size) {
        return make_error(ENOTSUP, "{}: shrinking a qcow2 image is not supported", name_);
    }
    if (new_size > (uint64_t{1} << 62)) {
        return make_error(EFBIG, "{}: size {} is too large", name_, new_size);
    }
    if (g_.l1_entries_for(new_size) > kMaxL1Bytes / 8) {
        return make_error(EFBIG, "{}: size {} needs an L1 table beyond {} bytes", name_, new_size,
                          kMaxL1Bytes);
    }
    return {};
}

Task<Status> Metadata::grow(uint64_t new_size) {
    auto guard = co_await lock_.lock();
    CO_TRY(check_new_size(new_size));
    if (new_size == header_.size) {
        co_return Status{};
    }
    if (g_.l1_entries_for(new_size) > l1_.size()) {
        co_return co_await switch_to_bigger_l1(g_.l1_entries_for(new_size), new_size);
    }
    uint8_t be[8];
    store_be64(be, new_size);
    CO_TRY(co_await write_header_bytes(kOffSize, ConstBuf(be, 8)));
    header_.size = new_size;
    co_return Status{};
}

Task<Status> Metadata::reserve_l1(uint64_t new_size) {
    auto guard = co_await lock_.lock();
    CO_TRY(check_new_size(new_size));
    if (g_.l1_entries_for(new_size) <= l1_.size()) {
        co_return Status{};
    }
    co_return co_await switch_to_bigger_l1(g_.l1_entries_for(new_size), header_.size);
}

// The caller holds lock_.
Task<Status> Metadata::switch_to_bigger_l1(uint64_t need, uint64_t size) {
    // A bigger L1 table: written and durable (with its refcounts) before the header switch.
    uint64_t clusters = (need * 8 + g_.cluster_size - 1) >> g_.cluster_bits;
    CO_TRY_ASSIGN(HostRun run, co_await alloc_clusters(clusters, true));
    const uint64_t host = run.offset;
    AlignedBuffer table = AlignedBuffer::zeroed(clusters << g_.cluster_bits);
    for (size_t i = 0; i < l1_.size(); ++i) {
        store_be64(table.data() + i * 8, l1_[i]);
    }
    file_->event(IoEvent::kL1);
    Status written = co_await file_->write(host, table.span());
    if (written && !lazy_refcounts_) {
        written = co_await write_back_refcounts();
    }
    if (written) {
        written = co_await sync();
    }
    if (!written) {
        co_await give_back_clusters(host, clusters);  // nothing names the new table yet
        co_return written;
    }
    // size through l1_table_offset, one write (crypt_method lies between and is kept).
    uint8_t fields[kOffL1TableOffset + 8 - kOffSize];
    store_be64(fields, size);
    store_be32(fields + (kOffCryptMethod - kOffSize), header_.crypt_method);
    store_be32(fields + (kOffL1Size - kOffSize), static_cast<uint32_t>(need));
    store_be64(fields + (kOffL1TableOffset - kOffSize), host);
    if (Status switched = co_await write_header_bytes(kOffSize, ConstBuf(fields, sizeof(fields)));
        !switched) {
        co_return unsettled_table_switch(&unsettled_l1_, "L1", std::move(switched).error());
    }
    unsettled_l1_.clear();  // the header names this table now, whatever came before
    uint64_t old_offset = header_.l1_table_offset;
    uint64_t old_clusters =
        (uint64_t{header_.l1_size} * 8 + g_.cluster_size - 1) >> g_.cluster_bits;
    header_.size = size;
    header_.l1_size = static_cast<uint32_t>(need);
    header_.l1_table_offset = host;
    l1_.resize(need, 0);
    metadata_clusters_.insert(host >> g_.cluster_bits, clusters);
    if (old_clusters > 0) {
        // The disk has grown, whatever happens to the old table: a failure to free it leaks
        // its clusters, and is not the grow's failure.
        if (Status freed = co_await free_clusters(old_offset, old_clusters, false);
            !freed && env_.log != nullptr) {
            env_.log->warn("{}: the old L1 table at {} stays allocated (leaked): {}", name_,
                           old_offset, freed.error().message());
        }
    }
    co_return Status{};
}

}  // namespace imgfs::qcow2
