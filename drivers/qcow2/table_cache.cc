#include "drivers/qcow2/table_cache.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <vector>

namespace imgfs::qcow2 {

TableCache::TableCache(Executor* executor, size_t table_bytes, size_t capacity, const char* kind)
    : executor_(executor),
      table_bytes_(table_bytes),
      capacity_(std::max<size_t>(capacity, 2)),
      kind_(kind) {}

TableCache::~TableCache() {
    for (auto& [off, e] : entries_) {
        assert(e->pins == 0 && "table cache destroyed with pinned tables");
    }
    for (auto& e : forgotten_) {
        assert(e->pins == 0 && "table cache destroyed with pinned tables");
    }
}

void TableCache::configure(size_t table_bytes, size_t capacity) {
    assert(entries_.empty());
    table_bytes_ = table_bytes;
    capacity_ = std::max<size_t>(capacity, 2);
}

TableCache::Ref::Ref(Entry* e) : e_(e) {
    ++e_->pins;
}

TableCache::Ref& TableCache::Ref::operator=(Ref&& o) noexcept {
    if (this != &o) {
        reset();
        e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
}

void TableCache::Ref::reset() {
    if (e_ != nullptr) {
        assert(e_->pins > 0);
        --e_->pins;
        e_ = nullptr;
    }
}

uint8_t* TableCache::Ref::data() const {
    return e_->data.data();
}
uint64_t TableCache::Ref::offset() const {
    return e_->offset;
}

TableCache::Entry* TableCache::insert(uint64_t offset) {
    shrink();
    drop_unpinned_forgotten();
    auto e = std::make_unique<Entry>();
    e->offset = offset;
    e->data = AlignedBuffer(table_bytes_);
    lru_.push_front(e.get());
    e->lru = lru_.begin();
    Entry* raw = e.get();
    entries_.emplace(offset, std::move(e));
    peak_size_ = std::max(peak_size_, entries_.size());
    return raw;
}

void TableCache::touch(Entry* e) {
    if (e->lru != lru_.begin()) {
        lru_.splice(lru_.begin(), lru_, e->lru);
    }
}

void TableCache::erase(Entry* e) {
    assert(e->pins == 0);
    if (e->dirty) {
        --dirty_count_;
    }
    lru_.erase(e->lru);
    entries_.erase(e->offset);
}

void TableCache::shrink() {
    auto it = lru_.end();
    while (entries_.size() >= capacity_ && it != lru_.begin()) {
        --it;
        Entry* e = *it;
        if (e->pins == 0 && !e->dirty && !e->loading) {
            auto victim = it;
            ++it;  // `it` stays valid: only the victim's node goes
            lru_.erase(victim);
            entries_.erase(e->offset);
        }
    }
}

Task<Result<TableCache::Ref>> TableCache::get(Child* file, uint64_t offset) {
    const uint64_t forgets_before = forgets_;
    for (;;) {
        auto it = entries_.find(offset);
        if (it == entries_.end()) {
            break;
        }
        Entry* e = it->second.get();  // stable: not used after the wait (looked up again)
        if (!e->loading) {
            ++hits_;
            touch(e);
            co_return Ref(e);
        }
        // Someone else is reading it: wait, then look again (the read may have failed).
        co_await e->loaded->wait();
        if (forgets_ != forgets_before) {
            co_return make_error(kStale, "{} at {:#x}: freed while it was being read", kind_,
                                 offset);
        }
    }
    ++misses_;
    Entry* e = insert(offset);
    e->loading = true;
    e->loaded = std::make_unique<WaitQueue>(executor_);
    Ref pin(e);
    Status st = co_await file->read(offset, e->data.span());
    e->loading = false;
    e->loaded->notify_all();
    if (!st) {
        pin.reset();
        if (!e->forgotten) {
            erase(e);
        }
        co_return make_error(st.error().errnum, "reading {} at {:#x}: {}", kind_, offset,
                             st.error().message());
    }
    if (e->forgotten) {
        // Freed during the read, which may have seen what the cluster's next user wrote
        // there: not a table to map through. The caller looks its place up again.
        pin.reset();
        co_return make_error(kStale, "{} at {:#x}: freed while it was being read", kind_, offset);
    }
    co_return pin;
}

TableCache::Ref TableCache::create(uint64_t offset) {
    assert(entries_.find(offset) == entries_.end());
    Entry* e = insert(offset);
    std::memset(e->data.data(), 0, table_bytes_);
    e->dirty = true;
    ++dirty_count_;
    return Ref(e);
}

TableCache::Ref TableCache::lookup(uint64_t offset) {
    auto it = entries_.find(offset);
    if (it == entries_.end() || it->second->loading) {
        return Ref();
    }
    ++hits_;
    touch(it->second.get());
    return Ref(it->second.get());
}

void TableCache::mark_dirty(const Ref& ref) {
    if (!ref.e_->dirty) {
        ref.e_->dirty = true;
        ++dirty_count_;
    }
}

void TableCache::forget(uint64_t offset) {
    // Counted even when not cached: a get waiting for a read of this table that failed, or
    // whose table was evicted since, would otherwise read the freed cluster in afresh.
    ++forgets_;
    auto it = entries_.find(offset);
    if (it == entries_.end()) {
        return;
    }
    Entry* e = it->second.get();
    if (e->pins == 0) {
        erase(e);
        return;
    }
    // Pinned (possibly still loading: its loader holds a pin and finds it forgotten). Out of
    // the index at once, so the next get of this offset reads the cluster's new contents.
    if (e->dirty) {
        e->dirty = false;
        --dirty_count_;
    }
    lru_.erase(e->lru);
    e->forgotten = true;
    forgotten_.push_back(std::move(it->second));
    entries_.erase(it);
}

void TableCache::drop_unpinned_forgotten() {
    std::erase_if(forgotten_, [](const std::unique_ptr<Entry>& e) { return e->pins == 0; });
}

bool TableCache::contains(uint64_t offset) const {
    return entries_.find(offset) != entries_.end();
}

std::vector<uint64_t> TableCache::cached_offsets() const {
    std::vector<uint64_t> offsets;
    offsets.reserve(entries_.size());
    for (const auto& [off, e] : entries_) {
        offsets.push_back(off);
    }
    return offsets;
}

void TableCache::clear() {
    // Its callers hold the node drained, so nothing should be pinned. A table that is (a
    // reader between a lookup and its use, a load still in flight) is forgotten rather than
    // freed under it: the reader keeps its copy, a loader finds it stale.
    std::vector<uint64_t> offsets;
    offsets.reserve(entries_.size());
    for (const auto& [off, e] : entries_) {
        offsets.push_back(off);
    }
    for (uint64_t off : offsets) {
        forget(off);
    }
    dirty_count_ = 0;
    drop_unpinned_forgotten();
}

Task<Status> TableCache::write_dirty(Child* file) {
    std::vector<uint64_t> offsets;
    for (auto& [off, e] : entries_) {
        if (e->dirty) {
            offsets.push_back(off);
        }
    }
    std::sort(offsets.begin(), offsets.end());
    for (uint64_t off : offsets) {
        // Looked up again each time: while a write was in flight another write-back may have
        // cleaned the table, and it may even have been evicted since.
        auto it = entries_.find(off);
        if (it == entries_.end() || !it->second->dirty) {
            continue;
        }
        // stable: pinned below, which keeps it in place while the write is in flight
        Entry* e = it->second.get();
        Ref pin(e);
        // Clean before the write: a change made while it is in flight marks it dirty again.
        e->dirty = false;
        --dirty_count_;
        Status st = co_await file->write(e->offset, e->data.span());
        if (!st) {
            if (!e->dirty && !e->forgotten) {
                e->dirty = true;
                ++dirty_count_;
            }
            co_return make_error(st.error().errnum, "writing {} at {:#x}: {}", kind_, e->offset,
                                 st.error().message());
        }
    }
    co_return Status{};
}

}  // namespace imgfs::qcow2
