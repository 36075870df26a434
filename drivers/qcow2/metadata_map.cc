// Metadata: the mapping core proper. map() says where guest bytes come from, plan_write() what a
// write needs, commit_write() links new clusters in, deallocate() zeroes and discards.
#include <algorithm>
#include <cassert>

#include "core/log.h"
#include "drivers/qcow2/metadata.h"

namespace imgfs::qcow2 {

namespace {

// Caps one allocation run so a plan never pins an unbounded amount of work.
constexpr uint32_t kMaxRunClusters = 1024;

ReadExtent::Kind kind_of(SubclusterType t) {
    switch (t) {
        case SubclusterType::kNormal:
            return ReadExtent::Kind::kData;
        case SubclusterType::kZeroPlain:
        case SubclusterType::kZeroAlloc:
            return ReadExtent::Kind::kZero;
        case SubclusterType::kCompressed:
            return ReadExtent::Kind::kCompressed;
        default:
            return ReadExtent::Kind::kBacking;
    }
}

L2Entry entry_at(const Geometry& g, const uint8_t* table, uint64_t guest) {
    return table != nullptr ? load_l2(g, table, g.l2_index(guest)) : L2Entry{};
}

// True if [from, to) (inside one cluster) can be written in place: the cluster is ours alone
// and every subcluster the range touches holds data.
bool writable_in_place(const Geometry& g, const L2Entry& e, uint64_t from, uint64_t to) {
    if (e.compressed() || !e.copied() || e.host_offset() == 0) {
        return false;
    }
    uint32_t first = g.subcluster_index(from);
    uint32_t last = g.subcluster_index(to - 1);
    for (uint32_t sc = first; sc <= last; ++sc) {
        if (subcluster_type(g, e, sc) != SubclusterType::kNormal) {
            return false;
        }
    }
    return true;
}

// A host cluster of ours that a write can fill without allocating (subclusters without data
// yet, or a preallocated zero cluster).
bool reusable(const L2Entry& e) {
    return !e.compressed() && e.copied() && e.host_offset() != 0;
}

}  // namespace

// ---- reads ----

Task<Result<ReadExtent>> Metadata::map(uint64_t offset, uint64_t bytes) {
    uint64_t l1i = g_.l1_index(offset);
    uint64_t table_end = (l1i + 1) * g_.l2_span();
    bytes = std::min(bytes, table_end - offset);
    CO_TRY_ASSIGN(TableCache::Ref ref, co_await l2_for_read(l1i));
    if (!ref) {
        co_return ReadExtent{ReadExtent::Kind::kBacking, bytes};
    }
    const uint8_t* table = ref.data();
    const uint64_t end = offset + bytes;
    const uint64_t cstart = g_.cluster_start(offset);
    L2Entry e = entry_at(g_, table, offset);
    if (const char* problem = l2_entry_problem(g_, e)) {
        co_return co_await corruption(
            fmt::format("L2 entry for guest offset {:#x}: {}", cstart, problem));
    }
    SubclusterType t = subcluster_type(g_, e, g_.subcluster_index(offset));
    if (t == SubclusterType::kInvalid) {
        co_return co_await corruption(
            fmt::format("L2 entry for guest offset {:#x} has an invalid bitmap", cstart));
    }
    ReadExtent x;
    x.kind = kind_of(t);
    if (x.kind == ReadExtent::Kind::kCompressed) {
        x.bytes = std::min(end, cstart + g_.cluster_size) - offset;
        x.compressed = decode_compressed(g_, e.word);
        x.cluster_guest_offset = cstart;
        if (x.compressed.host_offset >= file_->node()->size()) {
            co_return co_await corruption(fmt::format(
                "compressed cluster for guest offset {:#x} starts beyond the end of the file",
                cstart));
        }
        co_return x;
    }
    if (x.kind == ReadExtent::Kind::kData) {
        x.host_offset = e.host_offset() + g_.in_cluster(offset);
    }
    // Extend the run over subclusters and clusters of the same kind (and contiguous host).
    uint64_t pos = offset;
    uint64_t expect_host = x.host_offset;
    for (;;) {
        uint32_t sc = g_.subcluster_index(pos);
        uint32_t run = same_type_run(g_, e, sc);
        uint64_t run_end = g_.cluster_start(pos) + (uint64_t{sc} + run) * g_.subcluster_size;
        expect_host += run_end - pos;
        pos = std::min(run_end, end);
        if (pos >= end || g_.in_cluster(pos) != 0) {
            break;
        }
        e = entry_at(g_, table, pos);
        if (l2_entry_problem(g_, e) != nullptr) {
            break;
        }
        SubclusterType next = subcluster_type(g_, e, 0);
        if (next == SubclusterType::kInvalid || kind_of(next) != x.kind ||
            (x.kind == ReadExtent::Kind::kData && e.host_offset() != expect_host)) {
            break;
        }
    }
    x.bytes = pos - offset;
    if (x.kind == ReadExtent::Kind::kData) {
        CO_TRY_ASSIGN(std::string problem,
                      co_await data_extent_problem(x.host_offset, x.bytes, false));
        if (!problem.empty()) {
            co_return co_await corruption(fmt::format("guest offset {:#x}: {}", offset, problem));
        }
    }
    co_return x;
}

// ---- writes ----

Result<WritePlan> Metadata::plan_in_table(const uint8_t* table, uint64_t offset, uint64_t bytes,
                                          uint32_t max_clusters) {
    const uint64_t cs = g_.cluster_size;
    const uint64_t end = offset + bytes;
    const uint64_t cstart = g_.cluster_start(offset);
    const uint64_t first_end = std::min(end, cstart + cs);
    L2Entry e0 = entry_at(g_, table, offset);
    if (const char* problem = l2_entry_problem(g_, e0)) {
        return make_error(EIO, "L2 entry for guest offset {:#x}: {}", cstart, problem);
    }
    WritePlan plan;
    plan.guest_offset = offset;
    if (writable_in_place(g_, e0, offset, first_end)) {
        plan.kind = WritePlan::Kind::kInPlace;
        plan.host_offset = e0.host_offset() + g_.in_cluster(offset);
        uint64_t covered = first_end;
        uint64_t expect_host = e0.host_offset() + cs;
        while (covered < end) {
            L2Entry e = entry_at(g_, table, covered);
            uint64_t ce = std::min(end, covered + cs);
            if (l2_entry_problem(g_, e) != nullptr || e.host_offset() != expect_host ||
                !writable_in_place(g_, e, covered, ce)) {
                break;
            }
            covered = ce;
            expect_host += cs;
        }
        plan.bytes = covered - offset;
        return plan;
    }
    plan.kind = WritePlan::Kind::kAllocate;
    plan.run_guest_start = cstart;
    uint64_t run_end = first_end;
    plan.clusters = 1;
    if (reusable(e0)) {
        plan.reuse_host = true;
        plan.host_start = e0.host_offset();
    } else {
        while (run_end < end && plan.clusters < max_clusters) {
            L2Entry e = entry_at(g_, table, run_end);
            uint64_t ce = std::min(end, run_end + cs);
            if (l2_entry_problem(g_, e) != nullptr || writable_in_place(g_, e, run_end, ce) ||
                reusable(e)) {
                break;
            }
            ++plan.clusters;
            run_end = ce;
        }
    }
    plan.bytes = run_end - offset;
    for (uint32_t i = 0; i < plan.clusters; ++i) {
        plan.old_entries.push_back(entry_at(g_, table, cstart + uint64_t{i} * cs));
    }
    // Copy-on-write: what of the new clusters the write leaves to the old content. With
    // extended L2 a fresh or reused cluster only needs the partial subclusters at the edges;
    // anything else (standard clusters, or a shared or compressed one being replaced whole)
    // needs the full cluster.
    const L2Entry& first = plan.old_entries.front();
    const L2Entry& last = plan.old_entries.back();
    auto partial_only = [&](const L2Entry& e) {
        return g_.extended_l2 && !e.compressed() && (e.host_offset() == 0 || plan.reuse_host);
    };
    uint64_t head = cstart;
    if (partial_only(first)) {
        head = align_down(offset, g_.subcluster_size);
        if (plan.reuse_host &&
            subcluster_type(g_, first, g_.subcluster_index(offset)) == SubclusterType::kNormal) {
            head = offset;
        }
    }
    const uint64_t last_start = cstart + uint64_t{plan.clusters - 1} * cs;
    uint64_t tail = last_start + cs;
    if (partial_only(last)) {
        tail = std::min(align_up(run_end, g_.subcluster_size), last_start + cs);
        if (plan.reuse_host && run_end < tail &&
            subcluster_type(g_, last, g_.subcluster_index(run_end)) == SubclusterType::kNormal) {
            tail = run_end;
        }
    }
    plan.cow_head_offset = head;
    plan.cow_head_bytes = offset - head;
    plan.cow_tail_offset = run_end;
    plan.cow_tail_bytes = tail - run_end;
    if (plan.reuse_host) {
        plan.host_offset = plan.host_start + (offset - cstart);
    }
    return plan;
}

Task<Result<WritePlan>> Metadata::plan_write(uint64_t offset, uint64_t bytes, bool allocate) {
    uint64_t l1i = g_.l1_index(offset);
    bytes = std::min(bytes, (l1i + 1) * g_.l2_span() - offset);
    if (!allocate) {
        // Classification only (no lock): the caller's tracked range keeps it valid.
        CO_TRY_ASSIGN(TableCache::Ref ref, co_await l2_for_read(l1i));
        Result<WritePlan> plan =
            plan_in_table(ref ? ref.data() : nullptr, offset, bytes, kMaxRunClusters);
        if (!plan) {
            co_return co_await corruption(plan.error().context);
        }
        co_return plan;
    }
    auto guard = co_await lock_.lock();
    if (corrupt_) {
        co_return make_error(EIO, "{}: the image is marked corrupt; writes are refused", name_);
    }
    CO_TRY_ASSIGN(TableCache::Ref ref, co_await l2_for_write(l1i));
    Result<WritePlan> planned = plan_in_table(ref.data(), offset, bytes, kMaxRunClusters);
    if (!planned) {
        co_return co_await corruption(planned.error().context);
    }
    WritePlan plan = std::move(*planned);
    if (plan.kind == WritePlan::Kind::kAllocate && !plan.reuse_host) {
        CO_TRY_ASSIGN(HostRun run, co_await alloc_clusters(plan.clusters, false));
        if (run.clusters < plan.clusters) {
            // Only a shorter contiguous run was free: plan for that many clusters. The table
            // is unchanged (we hold the lock and the range).
            planned = plan_in_table(ref.data(), offset, bytes, static_cast<uint32_t>(run.clusters));
            if (!planned) {
                co_return co_await corruption(planned.error().context);
            }
            plan = std::move(*planned);
            assert(plan.clusters == run.clusters);
        }
        plan.host_start = run.offset;
        plan.newly_allocated = true;
        plan.host_offset = plan.host_start + (offset - plan.run_guest_start);
        if (Status st =
                check_data_range(plan.host_start, uint64_t{plan.clusters} * g_.cluster_size);
            !st) {
            co_return co_await corruption(st.error().context);
        }
    } else if (plan.kind == WritePlan::Kind::kAllocate) {
        // Into a cluster the entry already names (preallocated zeroes, subclusters): checked as
        // a write in place is, or a damaged entry would write over metadata or another range.
        CO_TRY_ASSIGN(std::string problem,
                      co_await data_extent_problem(
                          plan.host_start, uint64_t{plan.clusters} * g_.cluster_size, true));
        if (!problem.empty()) {
            co_return co_await corruption(
                fmt::format("guest offset {:#x}: {}", plan.run_guest_start, problem));
        }
    }
    ref.reset();
    if (Status trimmed = co_await trim_caches(); !trimmed) {
        if (plan.newly_allocated) {
            // The caller gets no plan, so it cannot abort_write: give the run back here.
            // Nothing references it yet; if that fails too, it leaks (a repair reclaims it).
            Status given_back = co_await free_clusters(plan.host_start, plan.clusters, false);
            if (!given_back && env_.log != nullptr) {
                env_.log->warn("{}: {} cluster(s) at {:#x} of a failed write leak: {}", name_,
                               plan.clusters, plan.host_start, given_back.error().message());
            }
        }
        co_return std::move(trimmed).error();
    }
    co_return plan;
}

L2Entry Metadata::new_entry_for(const WritePlan& plan, uint32_t i, const L2Entry& old) const {
    const uint64_t cs = g_.cluster_size;
    L2Entry n;
    n.word = (plan.host_start + uint64_t{i} * cs) | kOflagCopied;
    if (!g_.extended_l2) {
        return n;
    }
    if (!plan.reuse_host && (old.compressed() || old.host_offset() != 0)) {
        n.bitmap = 0xffffffffULL;  // the whole old cluster was copied
        return n;
    }
    uint64_t cl_start = plan.run_guest_start + uint64_t{i} * cs;
    uint64_t lo = std::max(cl_start, plan.cow_head_offset);
    uint64_t hi = std::min(cl_start + cs, plan.cow_tail_offset + plan.cow_tail_bytes);
    uint32_t sc_lo = static_cast<uint32_t>((lo - cl_start) >> g_.subcluster_bits);
    uint32_t sc_hi = static_cast<uint32_t>((hi - 1 - cl_start) >> g_.subcluster_bits);
    uint64_t bits = alloc_bits(sc_lo, sc_hi - sc_lo + 1);
    uint64_t old_bits = old.host_offset() != 0 ? old.bitmap : (old.bitmap & ~0xffffffffULL);
    n.bitmap = (old_bits | bits) & ~(bits << 32);
    return n;
}

// `*linked` says whether the table entries changed: until they have, nothing references the
// plan's new clusters, and a failure leaves them for the caller to give back.
Task<Status> Metadata::link_clusters(WritePlan plan, bool* linked) {
    *linked = false;
    uint64_t l1i = g_.l1_index(plan.run_guest_start);
    CO_TRY_ASSIGN(TableCache::Ref ref, co_await l2_for_write(l1i));
    if (!plan.reuse_host) {
        // The old clusters lose this reference below: checked before anything changes.
        for (uint32_t i = 0; i < plan.clusters; ++i) {
            if (std::string problem = free_problem(plan.old_entries[i]); !problem.empty()) {
                co_return co_await corruption(
                    fmt::format("L2 entry for guest offset {:#x}: {}",
                                plan.run_guest_start + uint64_t{i} * g_.cluster_size, problem));
            }
        }
        CO_TRY(co_await depend_l2_on_refcounts());
    }
    bool frees = false;
    for (uint32_t i = 0; i < plan.clusters; ++i) {
        uint64_t guest = plan.run_guest_start + uint64_t{i} * g_.cluster_size;
        const L2Entry& old = plan.old_entries[i];  // stable: the plan is this coroutine's copy
        L2Entry current = load_l2(g_, ref.data(), g_.l2_index(guest));
        assert(current.word == old.word && current.bitmap == old.bitmap &&
               "an L2 entry changed under a serialised write");
        (void)current;  // read only by the assert
        store_l2(g_, ref.data(), g_.l2_index(guest), new_entry_for(plan, i, old));
        frees = frees || (!plan.reuse_host && (old.compressed() || old.host_offset() != 0));
    }
    l2_cache_.mark_dirty(ref);
    *linked = true;
    // Rule 1: the entries point at data this write (and its COW) just put there. Not only after
    // a COW: a cluster reused in place (zeroed with its allocation kept) still holds old data,
    // and with lazy refcounts no refcount sync comes first. Where the refcount dependency
    // syncs anyway, that sync clears the flag, so this costs no second one.
    l2_needs_data_sync_ = true;
    if (frees) {
        // The replaced clusters (shared with a snapshot, compressed, or a preallocated zero
        // cluster) lose this reference only after the new entries are durable.
        CO_TRY(co_await depend_refcounts_on_l2());
        for (const L2Entry& old : plan.old_entries) {
            CO_TRY(co_await free_entry_clusters(old, false));
        }
    }
    co_return Status{};
}

Task<Status> Metadata::commit_write(WritePlan plan) {
    assert(plan.kind == WritePlan::Kind::kAllocate);
    auto guard = co_await lock_.lock();
    if (corrupt_) {
        co_return make_error(EIO, "{}: the image is marked corrupt; writes are refused", name_);
    }
    bool linked = false;
    if (Status st = co_await link_clusters(plan, &linked); !st) {
        if (!linked && !corrupt_ && plan.newly_allocated) {
            // Reading or copying the L2 table, or writing the tables back, failed (a full
            // disk): the data run was never linked, and would leak.
            co_await give_back_clusters(plan.host_start, plan.clusters);
        }
        co_return st;
    }
#ifdef IMGFS_DEBUG_CHECKS
    co_await debug_check_invariants("linking new clusters");
#endif
    // A write-back error here fails the write although it is linked (and reads show it): a
    // failed write's content is unspecified, and the error is what stops writers from piling
    // dirty tables up in memory while the host refuses them. The caller must not abort_write.
    co_return co_await trim_caches();
}

Task<void> Metadata::abort_write(WritePlan plan) {
    if (!plan.newly_allocated) {
        co_return;
    }
    auto guard = co_await lock_.lock();
    co_await give_back_clusters(plan.host_start, plan.clusters);
#ifdef IMGFS_DEBUG_CHECKS
    co_await debug_check_invariants("giving back the clusters of a failed write");
#endif
}

// ---- zeroes and discards ----

bool Metadata::can_zero(bool has_backing) const {
    return header_.version >= 3 || !has_backing;
}

Task<Status> Metadata::deallocate(uint64_t offset, uint64_t bytes, DeallocMode mode,
                                  bool has_backing, std::vector<GuestRange>* fallback) {
    // One L2 table at a time, each under the lock and with the caches trimmed after it: a
    // discard of a whole large disk (fstrim, blkdiscard) would otherwise keep every table it
    // touched dirty in memory, and hold every other request's allocation back until the end.
    // Overlapping guest requests are kept out by the node's range lock meanwhile.
    const uint64_t end = offset + bytes;
    while (offset < end) {
        auto guard = co_await lock_.lock();
        if (corrupt_) {
            co_return make_error(EIO, "{}: the image is marked corrupt; writes are refused", name_);
        }
        uint64_t l1i = g_.l1_index(offset);
        uint64_t n = std::min(end, (l1i + 1) * g_.l2_span()) - offset;
        CO_TRY(co_await deallocate_in_table(offset, n, mode, has_backing, fallback));
        offset += n;
        CO_TRY(co_await trim_caches());
#ifdef IMGFS_DEBUG_CHECKS
        if (offset >= end) {
            co_await debug_check_invariants("zeroing or discarding");
        }
#endif
    }
    co_return Status{};
}

L2Entry Metadata::deallocated_entry(const L2Entry& old, uint64_t from, uint64_t to,
                                    DeallocMode mode, bool has_backing, bool* free_old) const {
    *free_old = false;
    const bool ours = reusable(old);
    if (!g_.extended_l2) {
        L2Entry n;
        bool keep = mode == DeallocMode::kZero && ours && header_.version >= 3;
        if (keep) {
            n.word = old.host_offset() | kOflagCopied | kOflagZero;
            return n;
        }
        bool zero_flag = header_.version >= 3 && has_backing;
        n.word = zero_flag ? kOflagZero : 0;
        *free_old = old.compressed() || old.host_offset() != 0;
        return n;
    }
    uint32_t sa = g_.subcluster_index(from);
    uint32_t count = static_cast<uint32_t>((to - from) >> g_.subcluster_bits);
    uint64_t bits = alloc_bits(sa, count);
    L2Entry n = old;
    n.bitmap = (old.bitmap & ~bits) | (bits << 32);
    if (old.compressed()) {
        n.word = 0;  // only ever called for the whole cluster
        n.bitmap = 0xffffffffULL << 32;
        *free_old = true;
        return n;
    }
    if ((n.bitmap & 0xffffffffULL) == 0 && old.host_offset() != 0 &&
        (mode != DeallocMode::kZero || !old.copied())) {
        n.word = 0;  // no data left in the host cluster: drop it
        *free_old = true;
    }
    return n;
}

Task<Status> Metadata::deallocate_in_table(uint64_t offset, uint64_t bytes, DeallocMode mode,
                                           bool has_backing, std::vector<GuestRange>* fallback) {
    const uint64_t cs = g_.cluster_size;
    uint64_t l1i = g_.l1_index(offset);
    bool reads_zero_unallocated = !has_backing || mode == DeallocMode::kDiscard;
    if ((l1_[l1i] & kOffsetMask) == 0 && reads_zero_unallocated) {
        co_return Status{};  // nothing allocated, and unallocated already reads as wanted
    }
    CO_TRY_ASSIGN(TableCache::Ref ref, co_await l2_for_write(l1i));
    // Every entry is checked before any is changed: a malformed one found half way would
    // leave the cached table edited but not dirty, differing from the disk until evicted.
    for (uint64_t pos = g_.cluster_start(offset); pos < offset + bytes; pos += cs) {
        const L2Entry e = load_l2(g_, ref.data(), g_.l2_index(pos));
        if (const char* problem = l2_entry_problem(g_, e)) {
            co_return co_await corruption(
                fmt::format("L2 entry for guest offset {:#x}: {}", pos, problem));
        }
        if (std::string problem = free_problem(e); !problem.empty()) {
            co_return co_await corruption(
                fmt::format("L2 entry for guest offset {:#x}: {}", pos, problem));
        }
    }
    std::vector<L2Entry> to_free;
    bool changed = false;
    for (uint64_t pos = offset; pos < offset + bytes;) {
        uint64_t cl_end = g_.cluster_start(pos) + cs;
        uint64_t to = std::min(offset + bytes, cl_end);
        uint64_t idx = g_.l2_index(pos);
        L2Entry old = load_l2(g_, ref.data(), idx);
        bool whole = to - pos == cs;
        if (old.compressed() && !whole) {
            fallback->push_back(GuestRange{pos, to - pos});
        } else {
            bool free_old = false;
            L2Entry n = deallocated_entry(old, pos, to, mode, has_backing, &free_old);
            if (n.word != old.word || n.bitmap != old.bitmap) {
                store_l2(g_, ref.data(), idx, n);
                changed = true;
                if (free_old) {
                    to_free.push_back(old);
                }
            }
        }
        pos = to;
    }
    if (changed) {
        l2_cache_.mark_dirty(ref);
    }
    if (!to_free.empty()) {
        CO_TRY(co_await depend_refcounts_on_l2());
        bool punch = mode != DeallocMode::kZero;
        for (const L2Entry& old : to_free) {
            CO_TRY(co_await free_entry_clusters(old, punch));
        }
    }
    co_return Status{};
}

}  // namespace imgfs::qcow2
