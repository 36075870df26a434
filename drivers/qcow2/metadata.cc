// Metadata: opening, header updates, write-back ordering, flush and close.
#include "drivers/qcow2/metadata.h"

#include <algorithm>
#include <cstring>

#include "core/event_loop.h"
#include "core/log.h"

namespace imgfs::qcow2 {

namespace {

constexpr uint64_t kDefaultL2CoverageBytes = 64ULL << 30;  // guest bytes the default L2 cache maps
constexpr uint64_t kMaxDefaultL2CacheBytes = 32ULL << 20;

size_t l2_cache_tables(const Geometry& g, const Options& o) {
    uint64_t bytes = o.l2_cache_bytes;
    if (bytes == 0) {
        // Enough L2 entries to map 64 GiB, within a bound for tiny clusters.
        bytes = std::min(kDefaultL2CoverageBytes / g.cluster_size * g.l2_entry_bytes,
                         kMaxDefaultL2CacheBytes);
    }
    return std::max<size_t>(16, bytes / g.cluster_size);
}

size_t refblock_cache_tables(const Geometry& g, const Options& o) {
    uint64_t bytes = o.refcount_cache_bytes;
    if (bytes == 0) {
        bytes = uint64_t{l2_cache_tables(g, o)} * g.cluster_size / 4;
    }
    return std::max<size_t>(4, bytes / g.cluster_size);
}

// Reads the header area: first enough for the fixed fields, then the whole first cluster.
Task<Result<Header>> read_header(Child* file, std::string name) {
    uint64_t file_size = file->node()->size();
    std::vector<uint8_t> first(std::min<uint64_t>(file_size, 512));
    CO_TRY(co_await file->read(0, first));
    if (first.size() < kOffClusterBits + 4 || load_be32(first.data() + kOffMagic) != kMagic) {
        co_return make_error(EINVAL, "{}: not a qcow2 image (bad magic)", name);
    }
    uint32_t cluster_bits = load_be32(first.data() + kOffClusterBits);
    if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
        co_return make_error(EINVAL, "{}: cluster_bits {} is out of range ({}..{})", name,
                             cluster_bits, kMinClusterBits, kMaxClusterBits);
    }
    std::vector<uint8_t> area(std::min<uint64_t>(file_size, 1ULL << cluster_bits));
    CO_TRY(co_await file->read(0, area));
    co_return parse_header(area, file_size, name);
}

}  // namespace

Metadata::Metadata(NodeEnv env, Child* file, std::string name, Options options)
    : env_(env),
      file_(file),
      name_(std::move(name)),
      options_(options),
      l2_cache_(env.loop, 512, 2, "L2 table"),
      refblock_cache_(env.loop, 512, 2, "refcount block"),
      lock_(env.loop),
      header_bits_lock_(env.loop) {}

Metadata::~Metadata() = default;

Task<Result<std::unique_ptr<Metadata>>> Metadata::open(NodeEnv env, Child* file, std::string name,
                                                       Options options) {
    CO_TRY_ASSIGN(Header header, co_await read_header(file, name));
    std::unique_ptr<Metadata> m(new Metadata(env, file, std::move(name), options));
    m->header_ = std::move(header);
    m->g_ = Geometry::from(m->header_);
    // The caches are sized from the geometry, known only now.
    m->l2_cache_.configure(m->g_.cluster_size, l2_cache_tables(m->g_, options));
    m->refblock_cache_.configure(m->g_.cluster_size, refblock_cache_tables(m->g_, options));
    CO_TRY(co_await m->load());
    co_return m;
}

Task<Status> Metadata::load() {
    CO_TRY(co_await load_tables());
    uint64_t file_size = file_->node()->size();
    CO_TRY_ASSIGN(snapshots_, co_await read_snapshot_table(file_, &header_, file_size, name_));
    end_cluster_ = (file_size + g_.cluster_size - 1) >> g_.cluster_bits;
    build_metadata_index();
    if (options_.read_only) {
        co_return Status{};
    }
    if ((header_.incompatible & kIncompatCorrupt) != 0) {
        co_return make_error(EACCES,
                             "{}: the image is marked corrupt and cannot be opened for "
                             "writing (qemu-img check -r all repairs it)",
                             name_);
    }
    co_return co_await prepare_for_writing();
}

Task<Status> Metadata::load_tables() {
    std::vector<uint8_t> buf(uint64_t{header_.l1_size} * 8);
    if (!buf.empty()) {
        CO_TRY(co_await file_->read(header_.l1_table_offset, buf));
    }
    l1_.resize(header_.l1_size);
    for (size_t i = 0; i < l1_.size(); ++i) {
        l1_[i] = load_be64(buf.data() + i * 8);
    }
    buf.assign(uint64_t{header_.refcount_table_clusters} << g_.cluster_bits, 0);
    CO_TRY(co_await file_->read(header_.refcount_table_offset, buf));
    refcount_table_.resize(buf.size() / 8);
    for (size_t i = 0; i < refcount_table_.size(); ++i) {
        refcount_table_[i] = load_be64(buf.data() + i * 8);
    }
    co_return Status{};
}

void Metadata::build_metadata_index() {
    const uint64_t cs = g_.cluster_size;
    metadata_clusters_.clear();
    // By runs, not cluster by cluster: snapshots may name the same large L1 table many times.
    auto add_range = [&](uint64_t offset, uint64_t bytes) {
        if (bytes != 0) {
            metadata_clusters_.insert(offset / cs, (offset + bytes - 1) / cs - offset / cs + 1);
        }
    };
    metadata_clusters_.insert(0);
    add_range(header_.l1_table_offset, uint64_t{header_.l1_size} * 8);
    add_range(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs);
    if (header_.nb_snapshots != 0) {
        add_range(header_.snapshots_offset, snapshots_.table_bytes);
        for (const SnapshotEntry& s : snapshots_.entries) {
            add_range(s.l1_table_offset, uint64_t{s.l1_size} * 8);
        }
    }
    for (uint64_t e : l1_) {
        if ((e & kOffsetMask) != 0) {
            metadata_clusters_.insert((e & kOffsetMask) / cs);
        }
    }
    for (uint64_t e : refcount_table_) {
        if ((e & ~kRefTableReservedMask) != 0) {
            metadata_clusters_.insert((e & ~kRefTableReservedMask) / cs);
        }
    }
    index_l2_overlaps();
}

// What other structure than an L2 table lies on `cluster`, if any (nullptr: none).
const char* Metadata::structure_on(uint64_t cluster, const ClusterSet& snapshot_l1s) const {
    const uint64_t cs = g_.cluster_size;
    auto within = [&](uint64_t offset, uint64_t bytes) {
        return bytes != 0 && cluster >= offset / cs && cluster <= (offset + bytes - 1) / cs;
    };
    if (within(header_.l1_table_offset, uint64_t{header_.l1_size} * 8)) {
        return "the L1 table";
    }
    if (within(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs)) {
        return "the refcount table";
    }
    if (header_.nb_snapshots != 0 && within(header_.snapshots_offset, snapshots_.table_bytes)) {
        return "the snapshot table";
    }
    if (snapshot_l1s.contains(cluster)) {
        return "a snapshot's L1 table";
    }
    return nullptr;
}

void Metadata::index_l2_overlaps() {
    const uint64_t cs = g_.cluster_size;
    l2_overlaps_.clear();
    ClusterSet snapshot_l1s;
    for (const SnapshotEntry& s : snapshots_.entries) {
        if (s.l1_size != 0) {
            snapshot_l1s.insert(s.l1_table_offset / cs,
                                (s.l1_table_offset + uint64_t{s.l1_size} * 8 - 1) / cs -
                                    s.l1_table_offset / cs + 1);
        }
    }
    std::unordered_set<uint64_t> refblocks;
    for (uint64_t e : refcount_table_) {
        if ((e & ~kRefTableReservedMask) != 0) {
            refblocks.insert((e & ~kRefTableReservedMask) / cs);
        }
    }
    index_refblock_overlaps(snapshot_l1s);
    std::unordered_map<uint64_t, uint64_t> copied_table_of;  // cluster -> first L1 index
    std::unordered_map<uint64_t, uint64_t> table_of;         // the same, COPIED or not
    l2_named_twice_.clear();
    for (uint64_t i = 0; i < l1_.size(); ++i) {
        const uint64_t off = l1_[i] & kOffsetMask;
        if (off == 0) {
            continue;
        }
        const char* what = structure_on(off / cs, snapshot_l1s);
        if (what == nullptr && refblocks.count(off / cs) != 0) {
            what = "a refcount block";
        }
        if (what != nullptr) {
            l2_overlaps_[i] = {off, what};
            continue;
        }
        if (auto [named, fresh] = table_of.emplace(off / cs, i); !fresh) {
            l2_named_twice_[i] = off;
            l2_named_twice_[named->second] = off;
        }
        if ((l1_[i] & kOflagCopied) == 0) {
            continue;  // shared with a snapshot: copied before it is changed
        }
        auto [first, fresh] = copied_table_of.emplace(off / cs, i);
        if (!fresh) {
            const std::string other = fmt::format("the L2 table of L1 entry {}", first->second);
            l2_overlaps_[i] = {off, other};
            l2_overlaps_[first->second] = {off, fmt::format("the L2 table of L1 entry {}", i)};
        }
    }
}

void Metadata::index_refblock_overlaps(const ClusterSet& snapshot_l1s) {
    const uint64_t cs = g_.cluster_size;
    refblock_overlaps_.clear();
    std::unordered_set<uint64_t> l2_tables;
    for (uint64_t e : l1_) {
        if ((e & kOffsetMask) != 0) {
            l2_tables.insert((e & kOffsetMask) / cs);
        }
    }
    for (uint64_t ri = 0; ri < refcount_table_.size(); ++ri) {
        const uint64_t block = refcount_table_[ri] & ~kRefTableReservedMask;
        if (block == 0) {
            continue;
        }
        const char* what = structure_on(block / cs, snapshot_l1s);
        if (what == nullptr && l2_tables.count(block / cs) != 0) {
            what = "an L2 table";
        }
        if (what != nullptr) {
            refblock_overlaps_[ri] = {block, what};
        }
    }
}

const std::string* Metadata::refblock_overlap(uint64_t ri, uint64_t block) const {
    auto it = refblock_overlaps_.find(ri);
    return it != refblock_overlaps_.end() && it->second.first == block ? &it->second.second
                                                                       : nullptr;
}

// The L1 table and the refcount table are written in place, one entry at a time. Sharing a
// cluster with each other, or with the snapshot table or a snapshot's L1 table, a write to one
// changes the other on disk while memory keeps the old: an L2 table's offset written into the
// L1 table becomes a refcount block's, and a snapshot silently maps other data. The header
// only checks each table against the file; checked here before the first write, as a reader
// never writes them.
Task<Status> Metadata::check_written_tables_apart() {
    const uint64_t cs = g_.cluster_size;
    struct Area {
        std::string what;
        uint64_t first = 0;
        uint64_t last = 0;
    };
    std::vector<Area> areas;  // the two written tables first
    auto add = [&](std::string what, uint64_t offset, uint64_t bytes) {
        if (bytes != 0) {
            areas.push_back(Area{std::move(what), offset / cs, (offset + bytes - 1) / cs});
        }
    };
    add("the L1 table", header_.l1_table_offset, uint64_t{header_.l1_size} * 8);
    add("the refcount table", header_.refcount_table_offset,
        uint64_t{header_.refcount_table_clusters} * cs);
    const size_t written = areas.size();
    if (header_.nb_snapshots != 0) {
        add("the snapshot table", header_.snapshots_offset, snapshots_.table_bytes);
    }
    for (const SnapshotEntry& s : snapshots_.entries) {
        add(fmt::format("the L1 table of snapshot {}", s.id), s.l1_table_offset,
            uint64_t{s.l1_size} * 8);
    }
    for (size_t i = 0; i < written; ++i) {
        for (size_t j = i + 1; j < areas.size(); ++j) {
            if (areas[i].first <= areas[j].last && areas[j].first <= areas[i].last) {
                co_return co_await corruption(fmt::format(
                    "{} (from {:#x}) and {} (from {:#x}) share a cluster", areas[i].what,
                    areas[i].first * cs, areas[j].what, areas[j].first * cs));
            }
        }
    }
    co_return Status{};
}

Task<Status> Metadata::prepare_for_writing() {
    // First: the steps below write the header and the tables.
    CO_TRY(co_await check_written_tables_apart());
    lazy_refcounts_ = (header_.compatible & kCompatLazyRefcounts) != 0;
    std::vector<uint64_t> dropped_bitmap_clusters;
    if (header_.version == 3 && header_.autoclear != 0) {
        // Before a repair: it counts nothing of the bitmaps, so their clusters come out free,
        // and the dirty bit it clears must not leave them claimed valid (ordering: the repair
        // syncs before it clears the dirty bit, which makes this write durable first).
        CO_TRY_ASSIGN(dropped_bitmap_clusters, co_await clear_autoclear_bits());
    }
    if ((header_.incompatible & kIncompatDirty) != 0) {
        if (env_.log != nullptr) {
            env_.log->warn("{}: image is dirty (refcounts may be stale); repairing", name_);
        }
        CO_TRY(co_await rebuild_refcounts());
        repaired_on_open_ = true;
        dropped_bitmap_clusters.clear();  // counted free by the repair already
    }
    CO_TRY(co_await find_allocation_end());
    CO_TRY(co_await free_dropped_bitmap_clusters(std::move(dropped_bitmap_clusters)));
    CO_TRY(co_await cross_check_references());
    co_await debug_check_invariants(kOpenStep);
    co_return Status{};
}

// ---- header updates ----

Task<Status> Metadata::write_header_bytes(uint64_t offset, ConstBuf bytes) {
    file_->event(IoEvent::kHeader);
    CO_TRY(co_await file_->write(offset, bytes));
    co_return co_await sync();
}

Task<Status> Metadata::set_incompatible_bit(uint64_t bit, bool on) {
    if (header_.version < 3) {
        co_return Status{};  // v2 has no feature bits; the in-memory state is all there is
    }
    // Read, change and write back as one step: the corrupt bit is set without lock_ (by a
    // read that finds damage), and one write computed from the bits before the other's would
    // undo it, on disk and in header_.
    auto bits_guard = co_await header_bits_lock_.lock();
    uint64_t v = on ? (header_.incompatible | bit) : (header_.incompatible & ~bit);
    uint8_t be[8];
    store_be64(be, v);
    CO_TRY(co_await write_header_bytes(kOffIncompatibleFeatures, ConstBuf(be, 8)));
    header_.incompatible = v;
    co_return Status{};
}

Task<Status> Metadata::mark_dirty_for_lazy_refcounts() {
    // Refcounts may lag behind the tables from now on: the bit must be durable first.
    CO_TRY(co_await set_incompatible_bit(kIncompatDirty, true));
    dirty_bit_set_ = true;
    co_return Status{};
}

Task<Status> Metadata::set_read_only(bool read_only) {
    auto guard = co_await lock_.lock();
    if (read_only == options_.read_only) {
        co_return Status{};
    }
    if (read_only) {
        if (dirty_bit_set_) {
            CO_TRY(co_await set_incompatible_bit(kIncompatDirty, false));
            dirty_bit_set_ = false;
        }
        options_.read_only = true;
        co_return Status{};
    }
    if ((header_.incompatible & kIncompatCorrupt) != 0 || corrupt_) {
        co_return make_error(EACCES, "{}: the image is marked corrupt and cannot be written",
                             name_);
    }
    options_.read_only = false;
    Status st = co_await prepare_for_writing();
    if (!st) {
        options_.read_only = true;
    }
    co_return st;
}

Task<Status> Metadata::set_backing(std::string name, std::optional<std::string> format) {
    auto guard = co_await lock_.lock();
    // It writes the whole header, feature bits included: none may change meanwhile.
    auto bits_guard = co_await header_bits_lock_.lock();
    Header h = header_;
    h.backing_file = name;
    h.backing_format = name.empty() ? std::nullopt : format;
    CO_TRY_ASSIGN(std::vector<uint8_t> area, serialize_header(&h));
    const uint64_t cs = g_.cluster_size;
    uint64_t old_end = std::max<uint64_t>(header_.backing_file_offset + header_.backing_file_size,
                                          header_.header_length);
    uint64_t ext_end = h.backing_file_offset != 0 ? h.backing_file_offset : area.size();
    // Where the new name can go without touching anything the old header uses: the end of the
    // first cluster, or, when the old name is there (the second rewrite), just before it. Then
    // the name is written first, durable, and the header that points at it changes only
    // fields in its first sector: a write torn by a power cut cannot pair the new offset with
    // bytes of the old name.
    uint64_t name_at = 0;
    const uint64_t floor = std::max<uint64_t>(ext_end, header_.header_length) + 8;
    if (!name.empty() && cs - name.size() >= std::max(old_end, ext_end) + 8) {
        name_at = cs - name.size();
    } else if (!name.empty() && header_.backing_file_offset >= floor + name.size()) {
        name_at = header_.backing_file_offset - name.size();
    }
    if (name_at != 0) {
        file_->event(IoEvent::kHeader);
        CO_TRY(co_await file_->write(
            name_at, ConstBuf(reinterpret_cast<const uint8_t*>(name.data()), name.size())));
        CO_TRY(co_await sync());
        area.resize(ext_end);
        h.backing_file_offset = name_at;
        store_be64(area.data() + kOffBackingFileOffset, name_at);
    }
    CO_TRY(co_await write_header_bytes(0, area));
    header_ = std::move(h);
    co_return Status{};
}

Task<Error> Metadata::corruption(std::string message) {
    if (env_.log != nullptr) {
        env_.log->error("{}: corruption detected: {}{}", name_, message,
                        options_.read_only || corrupt_ ? "" : "; marking the image corrupt");
    }
    if (!options_.read_only && !corrupt_) {
        corrupt_ = true;
        // Best effort: the image is unusable for writes either way, and the caller gets the
        // corruption error; the bit only tells the next opener (QEMU, a later mount).
        Status marked = co_await set_incompatible_bit(kIncompatCorrupt, true);
        if (!marked && env_.log != nullptr) {
            env_.log->error("{}: cannot mark the image corrupt on disk: {}", name_,
                            marked.error().message());
        }
    }
    co_return make_error(EIO, "{}: {}", name_, message);
}

Status Metadata::check_data_range(uint64_t host_offset, uint64_t bytes) {
    if (bytes == 0) {
        return {};
    }
    const uint64_t first = host_offset >> g_.cluster_bits;
    const uint64_t last = (host_offset + bytes - 1) >> g_.cluster_bits;
    if (std::optional<uint64_t> c = metadata_clusters_.first_in(first, last - first + 1)) {
        return make_error(EIO, "data at host offset {:#x} would overlap metadata",
                          *c << g_.cluster_bits);
    }
    return {};
}

// ---- write-back ordering ----

Task<Status> Metadata::sync() {
    CO_TRY(co_await file_->flush());
    // Everything written so far is durable: no COW data is waiting for a flush any more.
    // Also when this sync ran without lock_ (corruption() marking the header): a commit that
    // sets the flag meanwhile passed commit_write's corrupt_ check before corruption() set
    // corrupt_, so its data had completed before this flush was issued.
    l2_needs_data_sync_ = false;
    co_return Status{};
}

Task<Status> Metadata::write_back_refcounts() {
    if (dependency_ == Dependency::kRefcountsAfterL2) {
        // A decrement is waiting for the L2 change that dropped the reference (rule 3).
        CO_TRY(co_await write_back_l2());
        CO_TRY(co_await sync());
        dependency_ = Dependency::kNone;
        tables_durable();
    }
    if (refblock_cache_.has_dirty()) {
        file_->event(IoEvent::kRefblockWrite);
    }
    co_return co_await refblock_cache_.write_dirty(file_);
}

Task<Status> Metadata::write_back_l2() {
    if (dependency_ == Dependency::kL2AfterRefcounts) {
        // L2 entries point at clusters whose refcount increase is still cached (rule 2).
        CO_TRY(co_await write_back_refcounts());
        CO_TRY(co_await sync());
        dependency_ = Dependency::kNone;
    }
    if (l2_needs_data_sync_ && l2_cache_.has_dirty()) {
        CO_TRY(co_await sync());  // COW data before the entries that point at it (rule 1)
    }
    if (l2_cache_.has_dirty()) {
        file_->event(IoEvent::kL2Write);
    }
    co_return co_await l2_cache_.write_dirty(file_);
}

Task<Status> Metadata::depend_l2_on_refcounts() {
    if (lazy_refcounts_) {
        co_return Status{};
    }
    if (dependency_ == Dependency::kRefcountsAfterL2) {
        // The opposite dependency is pending; settle it first so the two never form a cycle.
        CO_TRY(co_await write_back_l2());
        CO_TRY(co_await sync());
        tables_durable();
    }
    dependency_ = Dependency::kL2AfterRefcounts;
    co_return Status{};
}

Task<Status> Metadata::depend_refcounts_on_l2() {
    if (lazy_refcounts_) {
        co_return Status{};
    }
    if (dependency_ == Dependency::kL2AfterRefcounts) {
        CO_TRY(co_await write_back_refcounts());
        CO_TRY(co_await sync());
    }
    dependency_ = Dependency::kRefcountsAfterL2;
    co_return Status{};
}

Task<Status> Metadata::trim_caches() {
    if (l2_cache_.over_capacity()) {
        CO_TRY(co_await write_back_l2());
        l2_cache_.shrink();
    }
    if (refblock_cache_.over_capacity()) {
        CO_TRY(co_await write_back_refcounts());
        refblock_cache_.shrink();
    }
    co_return Status{};
}

Task<void> Metadata::punch_freed() {
    std::vector<uint64_t> candidates;
    candidates.swap(to_punch_);
    std::sort(candidates.begin(), candidates.end());
    candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
    // Adjacent clusters still free go to the file as one punch: a guest's trim of many
    // clusters costs a few calls under the metadata lock, not one per cluster.
    size_t i = 0;
    while (i < candidates.size()) {
        const size_t run_first = i;
        uint64_t run_start = 0;
        uint64_t run_clusters = 0;
        Status st;
        for (; i < candidates.size(); ++i) {
            const uint64_t c = candidates[i];
            if (run_clusters != 0 && c != run_start + run_clusters) {
                break;
            }
            Result<uint64_t> rc = co_await get_refcount(c);
            if (!rc) {
                st = std::move(rc).error();
                break;
            }
            const bool punchable = *rc == 0 && punching_.count(c) == 0 &&  // else reused, or
                                   !metadata_clusters_.first_in(c, 1);     // a table a damaged
                                                                           // count missed
            if (!punchable) {
                if (run_clusters != 0) {
                    ++i;  // ends the run, and is itself done with
                    break;
                }
                continue;
            }
            run_start = run_clusters == 0 ? c : run_start;
            ++run_clusters;
        }
        if (st && run_clusters != 0) {
            // The allocator skips these until the hole is punched, so a punch can never land
            // on a cluster that was handed out again.
            for (uint64_t c = run_start; c < run_start + run_clusters; ++c) {
                punching_.insert(punching_.end(), c);
            }
            st = co_await file_->discard(run_start << g_.cluster_bits,
                                         run_clusters << g_.cluster_bits);
            punching_.erase(punching_.lower_bound(run_start),
                            punching_.lower_bound(run_start + run_clusters));
            release_to_allocator(run_start);  // reusable again (alloc_clusters)
        }
        if (!st) {
            if (!punch_failure_logged_ && env_.log != nullptr) {
                env_.log->warn(
                    "{}: cannot give freed clusters' space back to the host file ({});"
                    " kept for a later flush",
                    name_, st.error().message());
            }
            punch_failure_logged_ = true;
            to_punch_.insert(to_punch_.end(),
                             candidates.begin() + static_cast<std::ptrdiff_t>(run_first),
                             candidates.end());
            co_return;
        }
    }
}

Task<Status> Metadata::flush() {
    auto guard = co_await lock_.lock();
    if (options_.read_only) {
        co_return Status{};
    }
    CO_TRY(co_await write_back_l2());
    CO_TRY(co_await write_back_refcounts());
    CO_TRY(co_await sync());
    dependency_ = Dependency::kNone;
    tables_durable();
    // The tables no longer referencing freed clusters are durable now: punch their holes.
    co_await punch_freed();
#ifdef IMGFS_DEBUG_CHECKS
    co_await debug_check_invariants("flush");
#endif
    co_return Status{};
}

Task<Status> Metadata::close() {
    CO_TRY(co_await flush());
    if (dirty_bit_set_) {
        auto guard = co_await lock_.lock();
        CO_TRY(co_await set_incompatible_bit(kIncompatDirty, false));
        dirty_bit_set_ = false;
    }
    co_return Status{};
}

}  // namespace imgfs::qcow2
