// Metadata: repair of a dirty image (lazy refcounts left stale by a crash). The references are
// counted from the tables (the active L1 and every snapshot's), a complete new refcount
// structure is written past the end of the image, and one header write switches to it. A crash
// in the middle leaves the old structure in force and the image still dirty, so the next open
// repairs again. Afterwards the COPIED flags of the active tables are made to match.
#include <algorithm>
#include <cstring>
#include <unordered_map>

#include "core/log.h"
#include "drivers/qcow2/metadata.h"
#include "drivers/qcow2/ref_counter.h"

namespace imgfs::qcow2 {

// `times`: how many L1 entries (active and snapshots') name this table. Its data clusters
// carry one reference per naming entry, so one read serves them all.
Task<Status> Metadata::count_l2_references(uint64_t l2_offset, uint64_t times,
                                           RefCounter* counter) {
    const uint64_t cs = g_.cluster_size;
    if ((l2_offset & (cs - 1)) != 0 || l2_offset + cs > file_->node()->size()) {
        co_return make_error(EIO, "L2 table at {:#x} is misaligned or beyond the end", l2_offset);
    }
    CO_TRY(counter->add(l2_offset, cs, "L2 table", times));
    AlignedBuffer table(cs);
    CO_TRY(co_await file_->read(l2_offset, table.span()));
    for (uint64_t i = 0; i < g_.l2_entries; ++i) {
        L2Entry e = load_l2(g_, table.data(), i);
        if (e.unallocated()) {
            continue;
        }
        if (const char* problem = l2_entry_problem(g_, e)) {
            co_return make_error(EIO, "L2 table at {:#x} entry {}: {}", l2_offset, i, problem);
        }
        if (e.compressed()) {
            CompressedRef c = decode_compressed(g_, e.word);
            CO_TRY(counter->add(c.host_offset, c.bytes, "compressed cluster", times));
        } else if (e.host_offset() != 0) {
            CO_TRY(counter->add(e.host_offset(), cs, "data cluster", times));
        }
    }
    co_return Status{};
}

// Work is bounded by the file, whatever the tables say: every L1 table is read once, and
// together they may not be larger than the file (only overlapping tables could be); every
// L2 table is read once, however many L1 entries name it.
Task<Status> Metadata::count_references(RefCounter* counter, uint64_t max_tables) {
    CO_TRY(counter->add(0, g_.cluster_size, "header"));
    CO_TRY(counter->add(header_.l1_table_offset, uint64_t{header_.l1_size} * 8, "L1 table"));
    std::unordered_map<uint64_t, uint64_t> times_named;  // L2 table offset -> L1 entries
    std::vector<uint64_t> tables;                        // in the order first named
    auto name_table = [&](uint64_t off) {
        if (off != 0 && times_named[off]++ == 0) {
            tables.push_back(off);
        }
    };
    for (uint64_t e : l1_) {
        name_table(e & kOffsetMask);
    }
    if (header_.nb_snapshots != 0) {
        CO_TRY(counter->add(header_.snapshots_offset, snapshots_.table_bytes, "snapshot table"));
        CO_TRY(check_snapshot_l1_total());
    }
    for (const SnapshotEntry& s : snapshots_.entries) {
        CO_TRY(counter->add(s.l1_table_offset, uint64_t{s.l1_size} * 8, "snapshot L1 table"));
        std::vector<uint8_t> l1(uint64_t{s.l1_size} * 8);
        CO_TRY(co_await file_->read(s.l1_table_offset, l1));
        for (uint32_t i = 0; i < s.l1_size; ++i) {
            name_table(load_be64(l1.data() + uint64_t{i} * 8) & kOffsetMask);
        }
    }
    if (tables.size() > max_tables) {
        co_return make_error(EFBIG, "{} L2 tables to read, more than {}", tables.size(),
                             max_tables);
    }
    for (uint64_t off : tables) {
        CO_TRY(co_await count_l2_references(off, times_named[off], counter));
    }
    co_return Status{};
}

Status Metadata::check_snapshot_l1_total() const {
    uint64_t total = 0;
    for (const SnapshotEntry& s : snapshots_.entries) {
        total += uint64_t{s.l1_size} * 8;  // each at most kMaxL1Bytes: no overflow
    }
    if (total > file_->node()->size()) {
        return make_error(EINVAL,
                          "{}: the snapshots' L1 tables add up to {} bytes, more than the file "
                          "holds ({} bytes): they overlap each other",
                          name_, total, file_->node()->size());
    }
    return {};
}

Task<Status> Metadata::rebuild_refcounts() {
    if (Status fits = RefCounter::fits(g_, file_->node()->size()); !fits) {
        co_return make_error(EFBIG,
                             "{}: the image is dirty (its refcounts may be stale) and too large "
                             "to repair here: {}; `qemu-img check -r all` repairs it",
                             name_, fits.error().message());
    }
    RefCounter counter(g_, file_->node()->size());
    CO_TRY(co_await count_references(&counter));
    CO_TRY(co_await write_new_refcounts(&counter));
    CO_TRY(co_await fix_copied_flags(&counter));
    CO_TRY(co_await sync());
    CO_TRY(co_await set_incompatible_bit(kIncompatDirty, false));
    if (env_.log != nullptr) {
        env_.log->info("{}: refcounts rebuilt ({} clusters)", name_, counter.clusters());
    }
    co_return Status{};
}

Task<Status> Metadata::write_new_refcounts(RefCounter* counter) {
    const uint64_t cs = g_.cluster_size;
    const uint64_t per_block = g_.refblock_entries;
    // The new structure goes past everything referenced: table first, then one block for
    // every range up to its own end. Its size depends on where it ends, so iterate.
    const uint64_t start = counter->clusters();
    uint64_t table_clusters = 1;
    uint64_t blocks = 0;
    for (;;) {
        uint64_t total = start + table_clusters + blocks;
        uint64_t need_blocks = (total + per_block - 1) / per_block;
        uint64_t need_table = (need_blocks * 8 + cs - 1) / cs;
        if (need_blocks == blocks && need_table == table_clusters) {
            break;
        }
        blocks = need_blocks;
        table_clusters = need_table;
    }
    if (table_clusters * cs > kMaxRefcountTableBytes) {
        co_return make_error(EFBIG, "{}: the rebuilt refcount table would be too large", name_);
    }
    const uint64_t blocks_start = start + table_clusters;
    for (uint64_t c = start; c < blocks_start + blocks; ++c) {
        counter->set(c, 1);
    }
    AlignedBuffer table = AlignedBuffer::zeroed(table_clusters * cs);
    AlignedBuffer block(cs);
    for (uint64_t b = 0; b < blocks; ++b) {
        std::memset(block.data(), 0, cs);
        for (uint64_t i = 0; i < per_block; ++i) {
            uint64_t v = counter->get(b * per_block + i);
            if (v > g_.refcount_max) {
                co_return make_error(EOVERFLOW,
                                     "{}: cluster {} has {} references, more than {} "
                                     "refcount bits hold",
                                     name_, b * per_block + i, v, g_.refcount_bits);
            }
            store_refcount(g_, block.data(), i, v);
        }
        CO_TRY(co_await file_->write((blocks_start + b) * cs, block.span()));
        store_be64(table.data() + b * 8, (blocks_start + b) * cs);
    }
    CO_TRY(co_await file_->write(start * cs, table.span()));
    CO_TRY(co_await sync());
    // refcount_table_offset and refcount_table_clusters, one write.
    uint8_t fields[kOffRefcountTableClusters + 4 - kOffRefcountTableOffset];
    store_be64(fields, start * cs);
    store_be32(fields + (kOffRefcountTableClusters - kOffRefcountTableOffset),
               static_cast<uint32_t>(table_clusters));
    CO_TRY(co_await write_header_bytes(kOffRefcountTableOffset, ConstBuf(fields, sizeof(fields))));
    header_.refcount_table_offset = start * cs;
    header_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
    refcount_table_.assign(table_clusters * cs / 8, 0);
    for (uint64_t b = 0; b < blocks; ++b) {
        refcount_table_[b] = (blocks_start + b) * cs;
    }
    refblock_cache_.clear();
    end_cluster_ = blocks_start + blocks;
    free_hint_ = 0;
    build_metadata_index();
    co_return Status{};
}

Task<Status> Metadata::fix_copied_flags(RefCounter* counter) {
    const uint64_t cs = g_.cluster_size;
    l2_cache_.clear();
    for (uint64_t i = 0; i < l1_.size(); ++i) {
        uint64_t off = l1_[i] & kOffsetMask;
        if (off == 0) {
            continue;
        }
        bool sole = counter->get(off / cs) == 1;
        uint64_t want = off | (sole ? kOflagCopied : 0);
        if (want != l1_[i]) {
            // Restored if the write fails: a later attempt must still find the entry wrong.
            const uint64_t was = l1_[i];
            l1_[i] = want;
            if (Status st = co_await write_l1_entry(i); !st) {
                l1_[i] = was;
                co_return st;
            }
        }
        if (!sole) {
            continue;  // a table shared with a snapshot keeps its entries as they are
        }
        AlignedBuffer table(cs);
        CO_TRY(co_await file_->read(off, table.span()));
        bool changed = false;
        for (uint64_t j = 0; j < g_.l2_entries; ++j) {
            L2Entry e = load_l2(g_, table.data(), j);
            if (e.compressed() || e.host_offset() == 0) {
                continue;
            }
            bool copied = counter->get(e.host_offset() / cs) == 1;
            uint64_t w = copied ? (e.word | kOflagCopied) : (e.word & ~kOflagCopied);
            if (w != e.word) {
                e.word = w;
                store_l2(g_, table.data(), j, e);
                changed = true;
            }
        }
        if (changed) {
            CO_TRY(co_await file_->write(off, table.span()));
        }
    }
    co_return Status{};
}

}  // namespace imgfs::qcow2
