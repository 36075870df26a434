// TableCache: an LRU cache of metadata tables (L2 tables or refcount blocks), one cluster each,
// keyed by host offset. It knows nothing about ordering: the metadata layer decides when dirty
// tables are written and what must reach the disk first. Entries in use are pinned by a Ref and
// never evicted; a full cache of dirty or pinned entries grows past its capacity until the owner
// writes tables back (over_capacity() tells it to).
#pragma once

#include <cerrno>
#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "core/buffer.h"
#include "core/node.h"
#include "core/task.h"
#include "core/wait_queue.h"

namespace imgfs::qcow2 {

class TableCache {
    struct Entry;

  public:
    TableCache(Executor* executor, size_t table_bytes, size_t capacity, const char* kind);
    TableCache(const TableCache&) = delete;
    TableCache& operator=(const TableCache&) = delete;
    ~TableCache();
    /// Sets the table size and capacity; only while the cache is empty.
    void configure(size_t table_bytes, size_t capacity);

    /// A pinned table. Its bytes stay valid (and in place) for the Ref's lifetime.
    class Ref {
      public:
        Ref() = default;
        Ref(Ref&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
        Ref& operator=(Ref&& o) noexcept;
        Ref(const Ref&) = delete;
        Ref& operator=(const Ref&) = delete;
        ~Ref() { reset(); }
        void reset();

        [[nodiscard]] explicit operator bool() const { return e_ != nullptr; }
        [[nodiscard]] uint8_t* data() const;
        [[nodiscard]] uint64_t offset() const;

      private:
        friend class TableCache;
        explicit Ref(Entry* e);
        Entry* e_ = nullptr;
    };

    /// The table at `offset`, read through `file` on a miss. Concurrent misses for the same
    /// table share one read. A get that waited for another's read while forget() was called
    /// (for any table) fails with ESTALE (kStale): the table it wanted may be the freed one, so the
    /// caller looks up where the table is again (reading it now would put the freed cluster's
    /// contents back in the cache).
    Task<Result<Ref>> get(Child* file, uint64_t offset);
    static constexpr int kStale = ESTALE;
    /// A new table at `offset`: zero-filled, dirty, not read. It must not be cached already.
    Ref create(uint64_t offset);
    /// The table if cached (no I/O).
    Ref lookup(uint64_t offset);
    void mark_dirty(const Ref& ref);
    /// Drops a cached table because its cluster was freed: later gets and lookups of `offset`
    /// read the disk again (the cluster may hold a new table or data by then), and a dirty
    /// change is dropped, never written. A pinned table stays valid for its holders (a read
    /// that mapped through it before the free) and goes with its last pin.
    void forget(uint64_t offset);
    /// Drops every table, dirty ones too (after a rebuild replaced them). Callers hold the node
    /// drained; a table pinned all the same stays valid for its holders, as with forget().
    void clear();

    /// True if the table is cached (no I/O, no effect on the LRU order).
    [[nodiscard]] bool contains(uint64_t offset) const;
    /// The offsets of the cached tables (for consistency checks).
    [[nodiscard]] std::vector<uint64_t> cached_offsets() const;
    [[nodiscard]] bool has_dirty() const { return dirty_count_ > 0; }
    [[nodiscard]] size_t size() const { return entries_.size(); }
    [[nodiscard]] size_t capacity() const { return capacity_; }
    [[nodiscard]] bool over_capacity() const { return entries_.size() > capacity_; }
    /// The most tables cached at once so far (tests: the cache stays bounded).
    [[nodiscard]] size_t peak_size() const { return peak_size_; }
    [[nodiscard]] uint64_t hits() const { return hits_; }
    [[nodiscard]] uint64_t misses() const { return misses_; }

    /// Writes every dirty table (in offset order) and marks it clean. Not durable: the caller
    /// flushes. On error the tables stay dirty.
    Task<Status> write_dirty(Child* file);
    /// Evicts clean, unpinned tables until within capacity.
    void shrink();

  private:
    struct Entry {
        uint64_t offset = 0;
        AlignedBuffer data;
        bool dirty = false;
        bool loading = false;
        bool forgotten = false;  // in forgotten_, no longer in entries_ or lru_
        int pins = 0;
        std::list<Entry*>::iterator lru;
        std::unique_ptr<WaitQueue> loaded;
    };
    Entry* insert(uint64_t offset);
    void touch(Entry* e);
    void erase(Entry* e);
    void drop_unpinned_forgotten();

    Executor* executor_;
    size_t table_bytes_;
    size_t capacity_;
    size_t peak_size_ = 0;
    const char* kind_;
    std::unordered_map<uint64_t, std::unique_ptr<Entry>> entries_;
    std::list<Entry*> lru_;                          // front: most recently used
    std::vector<std::unique_ptr<Entry>> forgotten_;  // forgotten while pinned
    size_t dirty_count_ = 0;
    uint64_t forgets_ = 0;  // calls of forget()
    uint64_t hits_ = 0;
    uint64_t misses_ = 0;
};

}  // namespace imgfs::qcow2
