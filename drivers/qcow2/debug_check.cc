// Metadata: the invariants of the in-memory state, checked after every metadata step in builds
// with IMGFS_DEBUG_CHECKS (the sanitizer build in CI). It sees what the caches hold, dirty
// tables included, so it catches a wrong step at the moment it happens instead of at the next
// write-back or crash:
//  - every cluster's refcount is at least the number of references to it (header, L1 and
//    refcount tables, refcount blocks, L2 tables, data and compressed clusters, snapshots);
//  - a cluster held back from reuse (freed, not yet durable; being punched) is referenced by
//    nothing;
//  - a COPIED flag on an active L1 or L2 entry means refcount 1;
//  - the L2 cache holds no table of a free cluster (it would be handed out again when the
//    cluster is reused).
// Failing any of them is a bug in this driver, so it asserts. Only small images are checked
// (the check reads every table): up to kMaxCheckedTables L2 tables.
#include <cassert>
#include <cstdio>
#include <string_view>

#include "core/log.h"
#include "drivers/qcow2/metadata.h"
#include "drivers/qcow2/ref_counter.h"

namespace imgfs::qcow2 {

// A table as the cache holds it (possibly dirty), else as the file does. Never loads it into
// the cache, so the check does not change what the driver would do next.
Task<Result<AlignedBuffer>> Metadata::peek_table(TableCache* cache, uint64_t offset) {
    AlignedBuffer copy(g_.cluster_size);
    if (TableCache::Ref ref = cache->lookup(offset)) {
        std::copy(ref.data(), ref.data() + g_.cluster_size, copy.data());
        co_return copy;
    }
    CO_TRY(co_await file_->read(offset, copy.span()));
    co_return copy;
}

Task<Result<uint64_t>> Metadata::peek_refcount(uint64_t cluster, PeekedBlocks* blocks) {
    uint64_t ri = cluster / g_.refblock_entries;
    uint64_t block = ri < refcount_table_.size() ? refcount_table_[ri] & ~kRefTableReservedMask : 0;
    if (block == 0) {
        co_return uint64_t{0};
    }
    auto it = blocks->find(block);
    if (it == blocks->end()) {
        CO_TRY_ASSIGN(AlignedBuffer b, co_await peek_table(&refblock_cache_, block));
        it = blocks->emplace(block, std::move(b)).first;
    }
    co_return load_refcount(g_, it->second.data(), cluster % g_.refblock_entries);
}

Task<Status> Metadata::count_active(RefCounter* counter, std::vector<uint64_t>* copied) {
    const uint64_t cs = g_.cluster_size;
    CO_TRY(counter->add(0, cs, "header"));
    CO_TRY(counter->add(header_.l1_table_offset, uint64_t{header_.l1_size} * 8, "L1 table"));
    CO_TRY(counter->add(header_.refcount_table_offset,
                        uint64_t{header_.refcount_table_clusters} * cs, "refcount table"));
    for (uint64_t e : refcount_table_) {
        if ((e & ~kRefTableReservedMask) != 0) {
            CO_TRY(counter->add(e & ~kRefTableReservedMask, cs, "refcount block"));
        }
    }
    for (uint64_t e : l1_) {
        uint64_t off = e & kOffsetMask;
        if (off == 0) {
            continue;
        }
        CO_TRY(counter->add(off, cs, "L2 table"));
        if ((e & kOflagCopied) != 0) {
            copied->push_back(off >> g_.cluster_bits);
        }
        CO_TRY_ASSIGN(AlignedBuffer table, co_await peek_table(&l2_cache_, off));
        for (uint64_t i = 0; i < g_.l2_entries; ++i) {
            L2Entry x = load_l2(g_, table.data(), i);
            if (x.compressed()) {
                CompressedRef c = decode_compressed(g_, x.word);
                CO_TRY(counter->add(c.host_offset, c.bytes, "compressed cluster"));
            } else if (x.host_offset() != 0) {
                CO_TRY(counter->add(x.host_offset(), cs, "data cluster"));
                if (x.copied()) {
                    copied->push_back(x.host_offset() >> g_.cluster_bits);
                }
            }
        }
    }
    co_return Status{};
}

Task<void> Metadata::debug_check_invariants(const char* step) {
#ifdef IMGFS_DEBUG_CHECKS
    if (debug_checks_off_) {
        co_return;
    }
    constexpr uint64_t kMaxCheckedTables = 64;
    uint64_t tables = 0;
    for (uint64_t e : l1_) {
        tables += (e & kOffsetMask) != 0 ? 1 : 0;
    }
    if (options_.read_only || corrupt_ || lazy_refcounts_ || tables > kMaxCheckedTables ||
        header_.nb_snapshots != 0) {
        co_return;  // lazy refcounts lag by design; snapshots' tables are checked on disk
    }
    RefCounter counter(g_, file_->node()->size());
    std::vector<uint64_t> copied;
    if (Status st = co_await count_active(&counter, &copied); !st) {
        co_return;  // a read failed (fault injection): nothing to conclude
    }
    std::string problem;
    PeekedBlocks blocks;  // each refcount block read once per check
    for (uint64_t c = 0; c < counter.clusters() && problem.empty(); ++c) {
        uint64_t refs = counter.get(c);
        if (refs == 0) {
            continue;
        }
        Result<uint64_t> rc = co_await peek_refcount(c, &blocks);
        if (!rc) {
            co_return;
        }
        if (*rc < refs) {
            problem = fmt::format("cluster {:#x} has {} references but refcount {}",
                                  c << g_.cluster_bits, refs, *rc);
        } else if (freed_unflushed_.count(c) != 0 || punching_.count(c) != 0) {
            problem = fmt::format("cluster {:#x} is held back from reuse but referenced",
                                  c << g_.cluster_bits);
        }
    }
    // No free cluster lies below the allocator's hint unless something holds it back: one
    // that did would never be handed out again, and the file would grow instead.
    const uint64_t below_hint = std::min(free_hint_, counter.clusters());
    for (uint64_t c = 0; c < below_hint && problem.empty(); ++c) {
        const uint64_t ri = c / g_.refblock_entries;
        const bool has_block =
            ri < refcount_table_.size() && (refcount_table_[ri] & ~kRefTableReservedMask) != 0;
        if (!has_block || counter.get(c) != 0 || freed_unflushed_.count(c) != 0 ||
            punching_.count(c) != 0 || freed_under_reads_.count(c) != 0 ||
            over_referenced_.count(c) != 0 || metadata_clusters_.first_in(c, 1).has_value()) {
            continue;
        }
        Result<uint64_t> rc = co_await peek_refcount(c, &blocks);
        if (!rc) {
            co_return;
        }
        if (*rc == 0) {
            problem = fmt::format("cluster {:#x} is free but below the allocator's hint {:#x}",
                                  c << g_.cluster_bits, free_hint_ << g_.cluster_bits);
        }
    }
    for (uint64_t c : copied) {
        Result<uint64_t> rc = co_await peek_refcount(c, &blocks);
        if (problem.empty() && rc && *rc != 1) {
            problem = fmt::format("cluster {:#x} is marked COPIED but has refcount {}",
                                  c << g_.cluster_bits, *rc);
        }
    }
    for (uint64_t off : l2_cache_.cached_offsets()) {
        Result<uint64_t> rc = co_await peek_refcount(off >> g_.cluster_bits, &blocks);
        if (problem.empty() && rc && *rc == 0) {
            problem = fmt::format("the L2 cache holds a table at {:#x}, a free cluster", off);
        }
    }
    if (!problem.empty() && std::string_view(step) == kOpenStep) {
        // Broken before we wrote anything (a damaged image the open checks let through, such
        // as a refcount too low): later checks could only report that again, not our bugs.
        if (env_.log != nullptr) {
            env_.log->warn("{}: metadata inconsistent when opened ({}); debug checks off", name_,
                           problem);
        }
        debug_checks_off_ = true;
    } else if (!problem.empty()) {
        if (env_.log != nullptr) {
            env_.log->error("{}: invariant broken after {}: {}", name_, step, problem);
        }
        std::fprintf(stderr, "INVARIANT %s: %s\n", step, problem.c_str());
        assert(false && "qcow2 metadata invariant broken (see the log)");
    }
#else
    (void)step;  // named only in the checks' messages, compiled out here
    co_return;
#endif
}

}  // namespace imgfs::qcow2
