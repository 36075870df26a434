// Metadata: the qcow2 mapping core. It answers "where are these guest bytes" (map) and "make
// room for this write" (plan_write / commit_write) as plans; the caller (Qcow2Node) does the data
// I/O. Metadata I/O (tables, refcounts, header) goes through the image's storage edge, so tests
// run it over an in-memory node.
//
// Metadata write order (docs/qcow2.md, "Write order"), and where each rule is enforced:
//  1. Data and copy-on-write data reach the storage before the L2 entry that points at them:
//     commit_write() runs after the data writes completed; l2_needs_data_sync_ (set by every
//     commit that links clusters) makes the next L2 write-back flush the storage first
//     (write_back_l2), unless a sync since (the refcount dependency's) made it durable.
//  2. Refcount increases are on disk before any table that points at the cluster:
//     depend_l2_on_refcounts() (write_back_l2 writes and syncs refcounts first); new L2 tables,
//     refcount blocks and tables are written and synced before the pointer to them.
//  3. An L2 entry is cleared on disk before the refcount drops: depend_refcounts_on_l2()
//     (write_back_refcounts writes and syncs L2 tables first). A freed cluster's host hole is
//     punched only after both are durable, and never while it could be reallocated.
// With lazy refcounts the dirty bit is set and synced before the first refcount update is
// allowed to lag (rules 2 and 3 for refcounts are then waived; reopening repairs).
// Errors fail towards leaked clusters: a cluster is referenced only after its refcount is.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/co_mutex.h"
#include "core/node.h"
#include "drivers/qcow2/cluster_set.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/l2_entry.h"
#include "drivers/qcow2/snapshot_table.h"
#include "drivers/qcow2/table_cache.h"

namespace imgfs::qcow2 {

struct Options {
    bool read_only = false;
    /// Bytes of L2 tables to cache; 0: enough for 64 GiB of guest data (8 MiB at 64 KiB
    /// clusters), at least 16 tables.
    uint64_t l2_cache_bytes = 0;
    /// Bytes of refcount blocks to cache; 0: a quarter of the L2 cache, at least 4 blocks.
    uint64_t refcount_cache_bytes = 0;
    /// How many L2 tables the check that no table uses a dropped bitmap's cluster reads at
    /// most (one read each, under the metadata lock); past it the clusters stay allocated.
    uint64_t bitmap_check_max_tables = 8192;
};

/// Where a run of guest bytes comes from.
struct ReadExtent {
    enum class Kind { kZero, kData, kCompressed, kBacking };
    Kind kind = Kind::kZero;
    uint64_t bytes = 0;        // run length from the queried offset (> 0)
    uint64_t host_offset = 0;  // kData: host byte offset of the queried offset
    CompressedRef compressed{};
    uint64_t cluster_guest_offset = 0;  // kCompressed: guest offset of the cluster's start
};

/// What a write needs.
struct WritePlan {
    enum class Kind {
        kInPlace,   // the clusters exist and are ours: write at host_offset, no metadata change
        kAllocate,  // new host clusters (or unallocated subclusters of an existing one)
    };
    Kind kind = Kind::kInPlace;
    uint64_t guest_offset = 0;  // the part of the request this plan covers
    uint64_t bytes = 0;
    uint64_t host_offset = 0;  // host byte offset of guest_offset
    // kAllocate:
    uint64_t run_guest_start = 0;  // cluster aligned
    uint32_t clusters = 0;
    uint64_t host_start = 0;  // host offset of run_guest_start
    bool reuse_host = false;  // extended L2: fill subclusters of an existing cluster of ours
    bool newly_allocated = false;
    // Guest ranges inside the run that the write does not cover but the new clusters must hold
    // (the old content: backing data, zeros, decompressed or shared data).
    uint64_t cow_head_offset = 0;
    uint64_t cow_head_bytes = 0;
    uint64_t cow_tail_offset = 0;
    uint64_t cow_tail_bytes = 0;
    std::vector<L2Entry> old_entries;  // one per cluster of the run
};

struct HostRun {
    uint64_t offset = 0;
    uint64_t clusters = 0;
};

struct GuestRange {
    uint64_t offset = 0;
    uint64_t bytes = 0;
};

enum class DeallocMode {
    kZero,       // read as zeros afterwards; keep host clusters of ours allocated
    kZeroUnmap,  // read as zeros afterwards; free host clusters
    kDiscard,    // content no longer needed (v2 with a backing file: shows the backing)
};

class RefCounter;

class Metadata {
  public:
    /// Reads and validates the header and tables through `file`. On a read-write open, also
    /// clears unknown autoclear bits and repairs a dirty image.
    static Task<Result<std::unique_ptr<Metadata>>> open(NodeEnv env, Child* file, std::string name,
                                                        Options options);
    Metadata(const Metadata&) = delete;
    Metadata& operator=(const Metadata&) = delete;
    ~Metadata();

    [[nodiscard]] const Header& header() const { return header_; }
    [[nodiscard]] const Geometry& geometry() const { return g_; }
    [[nodiscard]] uint64_t size() const { return header_.size; }
    [[nodiscard]] bool read_only() const { return options_.read_only; }
    /// A detected inconsistency stopped writes to this image.
    [[nodiscard]] bool corrupt() const { return corrupt_; }
    [[nodiscard]] bool repaired_on_open() const { return repaired_on_open_; }
    [[nodiscard]] const SnapshotTable& snapshots() const { return snapshots_; }
    [[nodiscard]] const TableCache& l2_cache() const { return l2_cache_; }
    /// Tests: forgets every cached refcount block, so that the next use of each reads it; false
    /// (and nothing forgotten) while one is dirty. None may be pinned or being read.
    bool drop_refblock_cache() {
        if (refblock_cache_.has_dirty()) {
            return false;
        }
        refblock_cache_.clear();
        return true;
    }

    /// The first run of [offset, offset + bytes) with one source. offset < size().
    Task<Result<ReadExtent>> map(uint64_t offset, uint64_t bytes);
    /// Taken before map() by a read of the host clusters map() gives it: until
    /// end_data_read(ticket), clusters freed meanwhile are not handed out again. Reads hold no
    /// range, so a discard can free such a cluster under the read (map() itself can suspend
    /// after reading the entry), and a write given it next would show its data to the read
    /// (another guest region's bytes).
    uint64_t begin_data_read() {
        reads_in_flight_.insert(++read_seq_);
        return read_seq_;
    }
    void end_data_read(uint64_t ticket);

    /// Plans the first part of a write of [offset, offset + bytes). The caller holds a tracked
    /// range over the clusters it touches, which keeps the answer valid. With `allocate` false
    /// this only classifies (no lock, no allocation). With `allocate` true the caller holds a
    /// serialising range over the run's clusters, and a kAllocate plan comes with its host
    /// clusters: the caller writes the data and COW ranges there and calls commit_write, or
    /// abort_write if the data could not be written.
    Task<Result<WritePlan>> plan_write(uint64_t offset, uint64_t bytes, bool allocate);
    Task<Status> commit_write(WritePlan plan);
    Task<void> abort_write(WritePlan plan);

    /// Granularity of deallocate(): subclusters with extended L2, else clusters.
    [[nodiscard]] uint64_t dealloc_granularity() const { return g_.subcluster_size; }
    /// Whether deallocate(kZero*) can express zeros (v3, or v2 without a backing file).
    [[nodiscard]] bool can_zero(bool has_backing) const;
    /// Changes whole granules of [offset, offset + bytes) (aligned to dealloc_granularity()).
    /// The caller holds a serialising range over the affected clusters. Parts it cannot express
    /// (part of a compressed cluster) are appended to `fallback` for the caller to write zeros.
    Task<Status> deallocate(uint64_t offset, uint64_t bytes, DeallocMode mode, bool has_backing,
                            std::vector<GuestRange>* fallback);

    /// Writes back every cache in dependency order and syncs the storage.
    Task<Status> flush();
    /// Grows the virtual size (the L1 table if needed).
    Task<Status> grow(uint64_t new_size);
    /// Makes the L1 table big enough for `new_size` without changing the virtual size, so
    /// that entries past the end can be written before the size that shows them is.
    Task<Status> reserve_l1(uint64_t new_size);
    /// Flushes and, with lazy refcounts, clears the dirty bit.
    Task<Status> close();
    /// Switches between read-only and read-write. Becoming writable does what a read-write
    /// open does (refuses a corrupt image, repairs a dirty one, clears autoclear bits);
    /// becoming read-only expects the caller to have flushed.
    Task<Status> set_read_only(bool read_only);
    /// Rewrites the backing file name and format (new name written before the fields that
    /// point at it, then synced).
    Task<Status> set_backing(std::string name, std::optional<std::string> format);

    /// A host range that overlaps metadata: EIO (the caller reports it as corruption).
    Status check_data_range(uint64_t host_offset, uint64_t bytes);
    /// What is wrong with freeing the clusters `e` names ("" if nothing): they overlap
    /// metadata, or have more references than their refcount. Dropping the entry's reference
    /// would then free a table, or data another entry still uses (a corrupt image).
    [[nodiscard]] std::string free_problem(const L2Entry& e) const;
    /// What is wrong with the host range of an existing mapping ("" if nothing): it overlaps
    /// metadata (check_data_range), lies past the end of the file without being allocated,
    /// or (`for_write`) is in a cluster with more references than its refcount
    /// (cross_check.cc). The caller reports a finding as corruption. An error means the check
    /// could not be made (reading a refcount block failed): an I/O error, never corruption.
    /// Not for freshly allocated clusters.
    Task<Result<std::string>> data_extent_problem(uint64_t host_offset, uint64_t bytes,
                                                  bool for_write);
    /// Reports an inconsistency: logs it, and on a writable image sets the corrupt bit and
    /// stops further writes. Returns the EIO error to give the request.
    Task<Error> corruption(std::string message);

    // Statistics for info and tests.
    [[nodiscard]] uint64_t allocated_clusters_hint() const { return end_cluster_; }
    /// For tests: clusters the allocator's scans have looked at so far.
    [[nodiscard]] uint64_t clusters_scanned() const { return clusters_scanned_; }

  private:
    Metadata(NodeEnv env, Child* file, std::string name, Options options);

    // ---- open (metadata.cc) ----
    Task<Status> load();
    Task<Status> load_tables();
    Task<Status> prepare_for_writing();
    /// Corruption if the L1 table or the refcount table shares a cluster with another table
    /// the header names (see metadata.cc).
    Task<Status> check_written_tables_apart();
    void build_metadata_index();
    // ---- repair (repair.cc) ----
    Task<Status> rebuild_refcounts();
    Task<Status> count_l2_references(uint64_t l2_offset, uint64_t times, RefCounter* counter);
    Task<Status> write_new_refcounts(RefCounter* counter);
    Task<Status> fix_copied_flags(RefCounter* counter);
    /// Counts the references of every table. `max_tables`: EFBIG, before any L2 table is
    /// read, if more are named.
    Task<Status> count_references(RefCounter* counter, uint64_t max_tables = UINT64_MAX);
    Status check_snapshot_l1_total() const;
    // ---- invariants of the in-memory state (debug_check.cc) ----
    /// Asserts the invariants after `step`; only with IMGFS_DEBUG_CHECKS (else a no-op the
    /// call sites compile out).
    /// At kOpenStep a broken invariant turns the checks off for this image instead.
    Task<void> debug_check_invariants(const char* step);
    static constexpr const char* kOpenStep = "open";
    Task<Result<AlignedBuffer>> peek_table(TableCache* cache, uint64_t offset);
    using PeekedBlocks = std::unordered_map<uint64_t, AlignedBuffer>;
    Task<Result<uint64_t>> peek_refcount(uint64_t cluster, PeekedBlocks* blocks);
    Task<Status> count_active(RefCounter* counter, std::vector<uint64_t>* copied);
    // ---- open-time checks (cross_check.cc) ----
    Task<Status> find_allocation_end();
    [[nodiscard]] bool references_countable() const;
    Task<Status> cross_check_references();
    // Persistent bitmaps (metadata_bitmaps.cc).
    Task<Result<std::vector<uint64_t>>> clear_autoclear_bits();
    Task<Result<std::vector<uint64_t>>> find_bitmap_clusters(std::vector<uint8_t> extension);
    Task<Status> free_dropped_bitmap_clusters(std::vector<uint64_t> clusters);
    [[nodiscard]] bool refblock_usable(uint64_t refcount_table_index) const;
    /// Whether the cluster at host `offset` lies wholly inside the file. Written so that it
    /// cannot wrap: a refcount table entry may name an offset just below 2^64.
    [[nodiscard]] bool cluster_in_file(uint64_t offset) const {
        const uint64_t size = file_->node()->size();
        return offset <= size && size - offset >= g_.cluster_size;
    }

    // ---- header updates (metadata.cc) ----
    Task<Status> write_header_bytes(uint64_t offset, ConstBuf bytes);
    Task<Status> set_incompatible_bit(uint64_t bit, bool on);
    Task<Status> mark_dirty_for_lazy_refcounts();

    // ---- write-back ordering (metadata.cc) ----
    Task<Status> sync();
    Task<Status> write_back_l2();
    Task<Status> write_back_refcounts();
    Task<Status> depend_l2_on_refcounts();
    Task<Status> depend_refcounts_on_l2();
    Task<Status> trim_caches();
    /// Punches the holes of freed clusters. Advisory: the clusters are free in the image
    /// whether or not the host file gives the space back, so a failure is logged (once) and
    /// the rest are kept for the next flush, never failing the flush that made data durable.
    Task<void> punch_freed();
    /// EIO naming the failed switch while `unsettled` is set.
    Status table_switch_settled(const std::string& unsettled) const;
    /// Records a failed header write of a table switch in `unsettled`; returns its error.
    Error unsettled_table_switch(std::string* unsettled, const char* table, Error error);

    // ---- tables (metadata_tables.cc) ----
    /// The L2 table for l1_index, or an empty Ref if unallocated.
    Task<Result<TableCache::Ref>> l2_for_read(uint64_t l1_index);
    Task<Result<TableCache::Ref>> l2_for_read_once(uint64_t l1_index);
    /// The L2 table for l1_index, allocated or copied (if shared) so it can be changed.
    Task<Result<TableCache::Ref>> l2_for_write(uint64_t l1_index);
    Task<Status> write_l1_entry(uint64_t l1_index);
    /// Sets L1 entry `l1_index` and writes it; on failure the cached entry stays as it was.
    Task<Status> switch_l1_entry(uint64_t l1_index, uint64_t entry);
    Task<Result<TableCache::Ref>> allocate_l2(uint64_t l1_index);
    Task<Status> write_new_l2(uint64_t host, const AlignedBuffer* content);
    [[nodiscard]] Status check_new_size(uint64_t new_size) const;
    Task<Status> switch_to_bigger_l1(uint64_t need, uint64_t size);
    Task<Result<TableCache::Ref>> copy_shared_l2(uint64_t l1_index);
    Status check_l1_entry(uint64_t l1_index, uint64_t entry);

    // ---- refcounts and allocation (metadata_refcount.cc) ----
    Task<Result<uint64_t>> get_refcount(uint64_t cluster);
    /// When a cluster whose count reaches 0 may be handed out again.
    enum class Reuse {
        kNow,  // nothing on disk references it (never linked, or the reference is gone durably)
        // A cached table dropped the reference: wait until the tables are durable, or a crash
        // could leave the old entry pointing at the next owner's data.
        kAfterTablesDurable,
    };
    Task<Status> update_refcount(uint64_t cluster, int64_t delta, bool punch_if_freed,
                                 Reuse reuse = Reuse::kNow);
    /// The tables are durable: clusters held for that may be handed out again.
    void tables_durable() {
        // Reusable now: the allocator's scan skipped them, so it starts from them again.
        if (!freed_unflushed_.empty()) {
            release_to_allocator(*freed_unflushed_.begin());
        }
        freed_unflushed_.clear();
    }
    /// A cluster the allocator skipped while it was held back is free for it now: no free
    /// cluster may lie below the hint, also when this happens while a scan runs (it suspends
    /// on refcount block reads), which would otherwise set the hint past it on its way out.
    void release_to_allocator(uint64_t cluster) {
        free_hint_ = std::min(free_hint_, cluster);
        released_low_ = std::min(released_low_, cluster);
    }
    /// Up to `count` contiguous clusters (exactly `count` if `exact`), now with refcount 1.
    Task<Result<HostRun>> alloc_clusters(uint64_t count, bool exact);
    Task<Result<HostRun>> alloc_at_end(uint64_t count);
    /// EFBIG if clusters up to `end_cluster` would not fit a 56-bit host offset.
    [[nodiscard]] Status check_host_end(uint64_t end_cluster) const;
    /// The refcount ranges (refcount-table indices) without a block that `clusters` clusters
    /// from `start`, followed by one new block per such range, touch.
    [[nodiscard]] std::vector<uint64_t> ranges_without_block(uint64_t start,
                                                             uint64_t clusters) const;
    Task<Status> free_clusters(uint64_t host_offset, uint64_t count, bool punch);
    Task<void> give_back_clusters(uint64_t host_offset, uint64_t count);
    Task<Status> free_entry_clusters(L2Entry e, bool punch);
    Task<Status> grow_refcount_table(uint64_t min_entries);
    Task<Status> write_refcount_table_entry(uint64_t index);

    // ---- mapping (metadata_map.cc) ----
    Task<Status> link_clusters(WritePlan plan, bool* linked);
    L2Entry new_entry_for(const WritePlan& plan, uint32_t i, const L2Entry& old) const;
    Task<Status> deallocate_in_table(uint64_t offset, uint64_t bytes, DeallocMode mode,
                                     bool has_backing, std::vector<GuestRange>* fallback);
    L2Entry deallocated_entry(const L2Entry& old, uint64_t from, uint64_t to, DeallocMode mode,
                              bool has_backing, bool* free_old) const;
    Result<WritePlan> plan_in_table(const uint8_t* table, uint64_t offset, uint64_t bytes,
                                    uint32_t max_clusters);

    NodeEnv env_;
    Child* file_;
    std::string name_;
    Options options_;
    Header header_;
    Geometry g_;
    SnapshotTable snapshots_;

    std::vector<uint64_t> l1_;              // active L1 table, host byte order
    std::vector<uint64_t> refcount_table_;  // host byte order
    TableCache l2_cache_;
    TableCache refblock_cache_;
    // Serialises every metadata change and write-back. Lookups of cached tables don't take it.
    CoMutex lock_;
    // Held for every read-modify-write of the header's feature bits, and for a whole-header
    // write. Taken after lock_ when both are held, never the other way round.
    CoMutex header_bits_lock_;

    enum class Dependency { kNone, kL2AfterRefcounts, kRefcountsAfterL2 };
    Dependency dependency_ = Dependency::kNone;
    bool l2_needs_data_sync_ = false;
    bool lazy_refcounts_ = false;
    bool dirty_bit_set_ = false;
    bool corrupt_ = false;
    bool repaired_on_open_ = false;
    [[maybe_unused]] bool debug_checks_off_ = false;  // inconsistent when opened (debug checks)

    // Allocation state.
    uint64_t free_hint_ = 0;  // no free cluster below this index (see alloc_clusters)
    uint64_t clusters_scanned_ = 0;
    uint64_t end_cluster_ = 0;  // first cluster index past everything allocated
    // Clusters whose refcount dropped to 0 and whose host range should be punched once the
    // metadata no longer pointing at them is durable; and those being punched right now, which
    // the allocator must skip.
    std::vector<uint64_t> to_punch_;
    std::set<uint64_t> punching_;
    bool punch_failure_logged_ = false;
    // Set when a header write switching to a new L1 or refcount table failed: the disk may
    // use either table, so no entry of that kind is written until a switch of the same kind
    // succeeds, which settles it (see unsettled_table_switch).
    std::string unsettled_l1_;
    std::string unsettled_refcount_table_;
    // Clusters whose last reference a cached table dropped, not handed out again until the
    // tables that no longer reference them are durable: else a crash could leave the old entry
    // pointing at the next owner's data (and, with lazy refcounts, where nothing orders L2
    // changes before refcount changes, two references to one cluster).
    std::set<uint64_t> freed_unflushed_;
    // Reads of host clusters in flight (begin_data_read tickets), and clusters freed while some
    // were: each with the last ticket then issued. Such a cluster is held until every read up
    // to that ticket is done (held_for_reads).
    uint64_t read_seq_ = 0;
    std::set<uint64_t> reads_in_flight_;
    std::map<uint64_t, uint64_t> freed_under_reads_;
    // The same entries as (ticket, cluster) in the order they were made, so tickets only grow:
    // when the oldest read ends, those it released are at the front (an entry whose cluster
    // was freed again since, with a later ticket, no longer matches the map and is skipped).
    std::deque<std::pair<uint64_t, uint64_t>> freed_under_reads_order_;
    bool held_for_reads(uint64_t cluster);
    // The lowest cluster released to the allocator since its current scan began.
    uint64_t released_low_ = UINT64_MAX;
    // Host clusters holding active metadata, for the overlap check on data writes.
    ClusterSet metadata_clusters_;
    // Active L1 entries (by index) whose L2 table, as the image was opened, is not a table of
    // its own: it lies on the L1 or refcount table, a refcount block, the snapshot table, or
    // another entry's table with COPIED set on both. A malformed image; each maps to the
    // offset it had and what it overlaps. Using such a table would let two structures
    // overwrite each other, so check_l1_entry refuses it (EIO) while the entry is unchanged.
    std::unordered_map<uint64_t, std::pair<uint64_t, std::string>> l2_overlaps_;
    // Active L1 entries whose L2 table another active entry names too, COPIED on at most one
    // of them (both: l2_overlaps_). QEMU never shares a table within one L1 table. Reading
    // through it is harmless, but a write in place (COPIED) would change what both ranges
    // show, and a copy would free the table under the other entry if its count does not
    // cover both: l2_for_write refuses those (EIO) while the entry is unchanged.
    // Maps to the table's offset; l2_for_write finds which entries name it at the time.
    std::unordered_map<uint64_t, uint64_t> l2_named_twice_;
    // The same for refcount blocks lying on other structures, by refcount table index. A
    // count updated there would be written over that structure.
    std::unordered_map<uint64_t, std::pair<uint64_t, std::string>> refblock_overlaps_;
    void index_l2_overlaps();
    void index_refblock_overlaps(const ClusterSet& snapshot_l1s);
    /// What a refcount block of table entry `ri` at `block` lies on, or null.
    [[nodiscard]] const std::string* refblock_overlap(uint64_t ri, uint64_t block) const;
    const char* structure_on(uint64_t cluster, const ClusterSet& snapshot_l1s) const;
    // Clusters the open-time cross-check found referenced more often than their refcount.
    struct OverReference {
        uint64_t references;
        uint64_t refcount;
    };
    std::unordered_map<uint64_t, OverReference> over_referenced_;
};

}  // namespace imgfs::qcow2
