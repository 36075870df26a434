// TableCache: hits and misses, shared concurrent misses, failed reads, LRU eviction (never of
// dirty or pinned tables), write-back in offset order and what an error leaves behind.
//
// The cache reads and writes through the edge of a test backend:
//
//   backend --user--> fault --filtered--> mem (1 MiB; table k on disk is filled with k + 1)
#include "drivers/qcow2/table_cache.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "core/transaction.h"
#include "drivers/fault.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

using qcow2::TableCache;
using test::MemNode;
using Ref = TableCache::Ref;

constexpr size_t kTable = 4096;
constexpr const char* kKind = "L2 table";

// The byte table `offset` holds on disk before any test writes.
uint8_t disk_byte(uint64_t offset) {
    return static_cast<uint8_t>(offset / kTable + 1);
}

bool all_bytes(const uint8_t* p, size_t n, uint8_t v) {
    return std::all_of(p, p + n, [v](uint8_t b) { return b == v; });
}

Task<void> get_into(TableCache* cache, Child* file, uint64_t offset,
                    std::optional<Result<Ref>>* out) {
    out->emplace(co_await cache->get(file, offset));
}

Task<void> write_dirty_into(TableCache* cache, Child* file, Status* out) {
    *out = co_await cache->write_dirty(file);
}

Task<void> join(TaskScope* s) {
    co_await s->join();
}

// Reads wait at a gate while held; the next read after fail_next is set fails with that errno
// (once). For a read that must fail *after* a second reader has begun waiting for it, which a
// fault filter above a held MemNode cannot do (it fails requests before they reach the gate).
class GateNode final : public Node {
  public:
    GateNode(NodeEnv env, uint64_t size) : Node(env, "gate"), gate_(env.loop) { size_ = size; }
    [[nodiscard]] const char* driver_name() const override { return "gate"; }
    void hold() { held_ = true; }
    void release() {
        held_ = false;
        gate_.notify_all();
    }

    int fail_next = 0;
    uint64_t reads = 0;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override {
        ++reads;
        while (held_) {
            co_await gate_.wait();
        }
        if (fail_next != 0) {
            int err = std::exchange(fail_next, 0);
            co_return make_error(err, "gate: injected read error at {}", offset);
        }
        std::memset(buf.data(), disk_byte(offset), buf.size());
        co_return Status{};
    }
    Task<Status> do_write(uint64_t, ConstBuf) override { co_return Status{}; }
    Task<Status> do_flush() override { co_return Status{}; }

  private:
    bool held_ = false;
    WaitQueue gate_;
};

class TableCacheTest : public test::LoopTest {
  protected:
    void SetUp() override {
        LoopTest::SetUp();
        mem_ = std::make_shared<MemNode>(env(), "mem", 1 << 20);
        for (size_t i = 0; i < mem_->data.size(); ++i) {
            mem_->data[i] = disk_byte(i);
        }
        Transaction tx(&graph_);
        fault_ = FaultNode::open(env(), "fault", &tx, mem_);
        ASSERT_TRUE(tx.commit().ok());
        file_ = use_rw(fault_)->root();
        ASSERT_NE(file_, nullptr);
    }

    Result<Ref> get(TableCache* cache, uint64_t offset) { return run(cache->get(file_, offset)); }
    // True if the table is cached (lookup: no I/O, but it counts as a use for the LRU order).
    static bool cached(TableCache* cache, uint64_t offset) {
        return static_cast<bool>(cache->lookup(offset));
    }
    // Fills a cached table with `v` and marks it dirty.
    static void dirty(TableCache* cache, uint64_t offset, uint8_t v) {
        Ref r = cache->lookup(offset);
        ASSERT_TRUE(r) << offset;
        std::memset(r.data(), v, kTable);
        cache->mark_dirty(r);
    }
    bool on_disk(uint64_t offset, uint8_t v) const {
        return all_bytes(mem_->data.data() + offset, kTable, v);
    }
    // A get that reads `offset` through a held gate and a second get waiting for that read;
    // `forgotten` is forgotten while the read is held. Results in `loader` and `waiter`.
    struct TwoGets {
        std::optional<Result<Ref>> loader;
        std::optional<Result<Ref>> waiter;
        uint64_t reads = 0;  // reads that reached the gate
    };
    void two_gets_across_a_forget(TableCache* cache, uint64_t offset, uint64_t forgotten,
                                  TwoGets* out) {
        auto gate = std::make_shared<GateNode>(env(), 1 << 20);
        Child* file = use_rw(gate)->root();
        ASSERT_NE(file, nullptr);
        TaskScope scope(loop_.get());
        gate->hold();
        scope.spawn(get_into(cache, file, offset, &out->loader));
        scope.spawn(get_into(cache, file, offset, &out->waiter));
        cache->forget(forgotten);
        gate->release();
        run(join(&scope));
        out->reads = gate->reads;
        ASSERT_TRUE(out->loader && out->waiter);
    }

    std::shared_ptr<MemNode> mem_;
    std::shared_ptr<FaultNode> fault_;
    Child* file_ = nullptr;
};

// ---- hits and misses ----

TEST_F(TableCacheTest, MissReadsOnceAndHitDoesNot) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    auto a = get(&cache, 2 * kTable);
    ASSERT_TRUE(a.ok()) << a.error().message();
    EXPECT_TRUE(all_bytes(a->data(), kTable, disk_byte(2 * kTable)));
    EXPECT_EQ(a->offset(), 2 * kTable);
    EXPECT_EQ(mem_->requests, 1U);
    EXPECT_EQ(cache.misses(), 1U);
    EXPECT_EQ(cache.hits(), 0U);
    uint8_t* where = a->data();
    a->reset();

    auto b = get(&cache, 2 * kTable);
    ASSERT_TRUE(b.ok()) << b.error().message();
    EXPECT_EQ(mem_->requests, 1U);  // no second read
    EXPECT_EQ(cache.misses(), 1U);
    EXPECT_EQ(cache.hits(), 1U);
    EXPECT_EQ(b->data(), where);  // the same bytes, in place

    // A second pin of the same table while the first is held.
    Ref c = cache.lookup(2 * kTable);
    ASSERT_TRUE(c);
    EXPECT_EQ(c.data(), where);
    EXPECT_EQ(cache.hits(), 2U);
    EXPECT_EQ(cache.size(), 1U);

    // lookup never reads.
    EXPECT_FALSE(cache.lookup(5 * kTable));
    EXPECT_EQ(mem_->requests, 1U);
    EXPECT_EQ(cache.size(), 1U);
}

TEST_F(TableCacheTest, ConcurrentMissesOfOneTableShareOneRead) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    std::optional<Result<Ref>> r1;
    std::optional<Result<Ref>> r2;
    std::optional<Result<Ref>> r3;
    std::optional<Result<Ref>> other;
    TaskScope scope(loop_.get());
    mem_->hold();
    scope.spawn(get_into(&cache, file_, 3 * kTable, &r1));
    scope.spawn(get_into(&cache, file_, 3 * kTable, &r2));
    scope.spawn(get_into(&cache, file_, 3 * kTable, &r3));
    scope.spawn(get_into(&cache, file_, 7 * kTable, &other));  // another table: its own read
    EXPECT_EQ(mem_->requests, 2U);
    EXPECT_EQ(mem_->active, 2);
    EXPECT_EQ(cache.size(), 2U);
    // While the read is in flight the table is not handed out.
    EXPECT_FALSE(cache.lookup(3 * kTable));
    mem_->release();
    run(join(&scope));

    ASSERT_TRUE(r1 && r2 && r3 && other);
    ASSERT_TRUE(r1->ok()) << r1->error().message();
    ASSERT_TRUE(r2->ok()) << r2->error().message();
    ASSERT_TRUE(r3->ok()) << r3->error().message();
    ASSERT_TRUE(other->ok()) << other->error().message();
    EXPECT_EQ(mem_->requests, 2U);
    EXPECT_EQ((*r1)->data(), (*r2)->data());
    EXPECT_EQ((*r1)->data(), (*r3)->data());
    EXPECT_TRUE(all_bytes((*r2)->data(), kTable, disk_byte(3 * kTable)));
    EXPECT_TRUE(all_bytes((*other)->data(), kTable, disk_byte(7 * kTable)));
    EXPECT_EQ(cache.misses(), 2U);
    EXPECT_EQ(cache.hits(), 2U);
}

TEST_F(TableCacheTest, FailedReadIsNotCached) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    fault_->add_rule(FaultRule{fault_op::kRead, EIO, true, 1});
    auto a = get(&cache, 3 * kTable);
    ASSERT_FALSE(a.ok());
    EXPECT_EQ(a.error().errnum, EIO);
    EXPECT_NE(a.error().context.find("reading L2 table at 0x3000"), std::string::npos)
        << a.error().context;
    EXPECT_EQ(cache.size(), 0U);
    EXPECT_FALSE(cache.lookup(3 * kTable));

    auto b = get(&cache, 3 * kTable);  // tried again: read again
    ASSERT_TRUE(b.ok()) << b.error().message();
    EXPECT_TRUE(all_bytes(b->data(), kTable, disk_byte(3 * kTable)));
    EXPECT_EQ(cache.misses(), 2U);
}

TEST_F(TableCacheTest, WaiterOfAFailedReadReadsForItself) {
    auto gate = std::make_shared<GateNode>(env(), 1 << 20);
    Child* file = use_rw(gate)->root();
    ASSERT_NE(file, nullptr);
    TableCache cache(loop_.get(), kTable, 8, kKind);
    std::optional<Result<Ref>> first;
    std::optional<Result<Ref>> second;
    TaskScope scope(loop_.get());
    gate->hold();
    scope.spawn(get_into(&cache, file, 2 * kTable, &first));
    scope.spawn(get_into(&cache, file, 2 * kTable, &second));  // waits for the first's read
    EXPECT_EQ(gate->reads, 1U);
    gate->fail_next = EIO;
    gate->release();
    run(join(&scope));

    ASSERT_TRUE(first && second);
    ASSERT_FALSE(first->ok());
    EXPECT_EQ(first->error().errnum, EIO);
    EXPECT_NE(first->error().context.find("reading L2 table at 0x2000"), std::string::npos)
        << first->error().context;
    ASSERT_TRUE(second->ok()) << second->error().message();
    EXPECT_TRUE(all_bytes((*second)->data(), kTable, disk_byte(2 * kTable)));
    EXPECT_EQ(gate->reads, 2U);
    EXPECT_EQ(cache.size(), 1U);
}

// ---- eviction ----

TEST_F(TableCacheTest, EvictsTheLeastRecentlyUsedCleanTable) {
    TableCache cache(loop_.get(), kTable, 3, kKind);
    const uint64_t a = 1 * kTable;
    const uint64_t b = 2 * kTable;
    const uint64_t c = 3 * kTable;
    const uint64_t d = 4 * kTable;
    const uint64_t e = 5 * kTable;
    ASSERT_TRUE(get(&cache, a).ok());
    ASSERT_TRUE(get(&cache, b).ok());
    ASSERT_TRUE(get(&cache, c).ok());
    EXPECT_EQ(cache.size(), 3U);
    EXPECT_FALSE(cache.over_capacity());
    ASSERT_TRUE(get(&cache, a).ok());  // a hit: a is now the most recent (a, c, b)

    ASSERT_TRUE(get(&cache, d).ok());  // full: b, the least recent, goes
    EXPECT_EQ(cache.size(), 3U);
    EXPECT_FALSE(cached(&cache, b));
    // Looked up in this order, the LRU order becomes (d, c, a).
    EXPECT_TRUE(cached(&cache, a));
    EXPECT_TRUE(cached(&cache, c));
    EXPECT_TRUE(cached(&cache, d));

    ASSERT_TRUE(get(&cache, e).ok());  // a goes
    EXPECT_FALSE(cached(&cache, a));
    EXPECT_TRUE(cached(&cache, c));
    EXPECT_TRUE(cached(&cache, d));
    EXPECT_TRUE(cached(&cache, e));
    EXPECT_EQ(cache.size(), 3U);
    EXPECT_EQ(mem_->requests, 5U);

    ASSERT_TRUE(get(&cache, b).ok());  // evicted earlier: read again
    EXPECT_EQ(mem_->requests, 6U);
    EXPECT_EQ(cache.misses(), 6U);
}

TEST_F(TableCacheTest, DirtyAndPinnedTablesAreNeverEvicted) {
    TableCache cache(loop_.get(), kTable, 2, kKind);
    const uint64_t a = 1 * kTable;
    const uint64_t b = 2 * kTable;
    const uint64_t c = 3 * kTable;
    const uint64_t d = 4 * kTable;
    {
        Ref r = cache.create(a);  // dirty, then unpinned
        std::memset(r.data(), 0xaa, kTable);
    }
    auto pinned = get(&cache, b);  // clean but pinned
    ASSERT_TRUE(pinned.ok());

    ASSERT_TRUE(get(&cache, c).ok());  // nothing can go: the cache grows
    EXPECT_EQ(cache.size(), 3U);
    EXPECT_TRUE(cache.over_capacity());

    ASSERT_TRUE(get(&cache, d).ok());  // c, clean and unpinned, is the only candidate
    EXPECT_EQ(cache.size(), 3U);
    EXPECT_FALSE(cached(&cache, c));
    EXPECT_TRUE(cached(&cache, a));
    EXPECT_TRUE(cached(&cache, b));
    EXPECT_TRUE(cached(&cache, d));

    // Unpinned, b may go too; the dirty a still may not.
    pinned->reset();
    cache.shrink();
    EXPECT_FALSE(cache.over_capacity());
    EXPECT_FALSE(cached(&cache, b));
    Ref ra = cache.lookup(a);
    ASSERT_TRUE(ra);
    EXPECT_TRUE(all_bytes(ra.data(), kTable, 0xaa));  // the unwritten change is still there
    ra.reset();
    EXPECT_EQ(mem_->requests, 3U);  // b, c and d were read; a never

    // Once written, a is an ordinary clean table.
    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_TRUE(on_disk(a, 0xaa));
    ASSERT_TRUE(get(&cache, c).ok());
    ASSERT_TRUE(get(&cache, b).ok());
    EXPECT_FALSE(cached(&cache, a));
    EXPECT_FALSE(cache.over_capacity());
}

TEST_F(TableCacheTest, TableBeingReadIsNotEvicted) {
    // Table 1 is read through a held gate; tables 2..4 through the MemNode edge, meanwhile.
    auto gate = std::make_shared<GateNode>(env(), 1 << 20);
    Child* slow_file = use_rw(gate)->root();
    ASSERT_NE(slow_file, nullptr);
    TableCache cache(loop_.get(), kTable, 2, kKind);
    std::optional<Result<Ref>> slow;
    TaskScope scope(loop_.get());
    gate->hold();
    scope.spawn(get_into(&cache, slow_file, 1 * kTable, &slow));
    for (uint64_t i = 2; i <= 4; ++i) {
        ASSERT_TRUE(get(&cache, i * kTable).ok());  // each evicts its predecessor, never table 1
        EXPECT_EQ(cache.size(), 2U);
    }
    EXPECT_FALSE(slow.has_value());
    gate->release();
    run(join(&scope));
    ASSERT_TRUE(slow && slow->ok());
    EXPECT_TRUE(all_bytes((*slow)->data(), kTable, disk_byte(1 * kTable)));
    EXPECT_TRUE(cached(&cache, 1 * kTable));
    EXPECT_EQ(gate->reads, 1U);
}

// ---- write-back ----

TEST_F(TableCacheTest, WriteDirtyWritesEveryDirtyTableInOffsetOrder) {
    TableCache cache(loop_.get(), kTable, 16, kKind);
    // Created out of order, so hash or insertion order would not pass for offset order.
    const std::vector<uint64_t> created = {5 * kTable, 1 * kTable, 7 * kTable,
                                           3 * kTable, 2 * kTable, 6 * kTable};
    std::vector<uint64_t> sorted = created;
    std::sort(sorted.begin(), sorted.end());
    for (uint64_t off : created) {
        Ref r = cache.create(off);
    }
    ASSERT_TRUE(get(&cache, 4 * kTable).ok());  // clean: never written
    EXPECT_TRUE(cache.has_dirty());

    // The write order, observed by failing the n-th write: tables before it in offset order are
    // on disk, the failing one and those after it are not.
    for (size_t n = 1; n <= sorted.size(); ++n) {
        const auto v = static_cast<uint8_t>(0x10 * n);
        for (size_t i = 0; i < sorted.size(); ++i) {
            dirty(&cache, sorted[i], static_cast<uint8_t>(v + i));
        }
        fault_->clear_rules();
        fault_->add_rule(FaultRule{fault_op::kWrite, EIO, true, n});
        Status st = run(cache.write_dirty(file_));
        ASSERT_FALSE(st.ok()) << n;
        EXPECT_EQ(st.error().errnum, EIO);
        EXPECT_NE(st.error().context.find(fmt::format("writing L2 table at {:#x}", sorted[n - 1])),
                  std::string::npos)
            << st.error().context;
        for (size_t i = 0; i < sorted.size(); ++i) {
            EXPECT_EQ(on_disk(sorted[i], static_cast<uint8_t>(v + i)), i < n - 1)
                << "n " << n << " table " << i;
        }
        EXPECT_TRUE(cache.has_dirty());
    }

    fault_->clear_rules();
    const uint64_t writes_before = fault_->count(fault_op::kWrite);
    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_FALSE(cache.has_dirty());
    const auto last = static_cast<uint8_t>(0x10 * sorted.size());
    for (size_t i = 0; i < sorted.size(); ++i) {
        EXPECT_TRUE(on_disk(sorted[i], static_cast<uint8_t>(last + i))) << i;
    }
    // Only the tables the failed pass left dirty were written: the last one.
    EXPECT_EQ(fault_->count(fault_op::kWrite) - writes_before, 1U);
    EXPECT_TRUE(on_disk(4 * kTable, disk_byte(4 * kTable)));

    // Everything is clean: nothing to write.
    const uint64_t writes = fault_->count(fault_op::kWrite);
    st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(fault_->count(fault_op::kWrite), writes);
}

TEST_F(TableCacheTest, AllDirtyTablesAreWrittenAndMarkedClean) {
    TableCache cache(loop_.get(), kTable, 16, kKind);
    for (uint64_t i = 1; i <= 4; ++i) {
        ASSERT_TRUE(get(&cache, i * kTable).ok());
        dirty(&cache, i * kTable, static_cast<uint8_t>(0xc0 + i));
    }
    const uint64_t writes = fault_->count(fault_op::kWrite);
    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(fault_->count(fault_op::kWrite) - writes, 4U);
    EXPECT_FALSE(cache.has_dirty());
    for (uint64_t i = 1; i <= 4; ++i) {
        EXPECT_TRUE(on_disk(i * kTable, static_cast<uint8_t>(0xc0 + i))) << i;
    }
    // Clean now, so a small capacity lets them all go.
    cache.shrink();
    EXPECT_FALSE(cache.over_capacity());
}

TEST_F(TableCacheTest, WriteErrorLeavesTheTableDirty) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    {
        Ref r = cache.create(kTable);
        std::memset(r.data(), 0x77, kTable);
    }
    fault_->add_rule(FaultRule{fault_op::kWrite, ENOSPC, false, 1});
    for (int attempt = 0; attempt < 2; ++attempt) {
        Status st = run(cache.write_dirty(file_));
        ASSERT_FALSE(st.ok());
        EXPECT_EQ(st.error().errnum, ENOSPC);
        EXPECT_NE(st.error().context.find("writing L2 table at 0x1000"), std::string::npos)
            << st.error().context;
        EXPECT_TRUE(cache.has_dirty());
        EXPECT_TRUE(on_disk(kTable, disk_byte(kTable)));
    }
    // Still dirty, so never evicted, and the change is still there to be written.
    cache.shrink();
    EXPECT_TRUE(cached(&cache, kTable));
    fault_->clear_rules();
    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_FALSE(cache.has_dirty());
    EXPECT_TRUE(on_disk(kTable, 0x77));
}

TEST_F(TableCacheTest, ChangeDuringTheWriteKeepsTheTableDirty) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    {
        Ref r = cache.create(kTable);
        std::memset(r.data(), 0x11, kTable);
    }
    Status st = Error{EINPROGRESS, ""};
    TaskScope scope(loop_.get());
    mem_->hold();
    scope.spawn(write_dirty_into(&cache, file_, &st));
    EXPECT_EQ(mem_->active, 1);
    dirty(&cache, kTable, 0x22);  // while the write is in flight
    mem_->release();
    run(join(&scope));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_TRUE(cache.has_dirty());  // the change must be written again

    st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_FALSE(cache.has_dirty());
    EXPECT_TRUE(on_disk(kTable, 0x22));
}

// Two write-backs at once (the metadata layer serialises its own under Metadata::lock_, but
// nothing in TableCache's contract forbids this): the first has table 2 in its list, the second
// writes and cleans it meanwhile, and the first then cleans it a second time.
TEST_F(TableCacheTest, ConcurrentWriteDirtyKeepsTheDirtyCount) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    for (uint64_t i = 1; i <= 2; ++i) {
        Ref r = cache.create(i * kTable);
        std::memset(r.data(), static_cast<int>(0x30 + i), kTable);
    }
    Status st1 = Error{EINPROGRESS, ""};
    Status st2 = Error{EINPROGRESS, ""};
    TaskScope scope(loop_.get());
    mem_->hold();
    scope.spawn(write_dirty_into(&cache, file_, &st1));  // writing table 1, will do 2 next
    scope.spawn(write_dirty_into(&cache, file_, &st2));  // table 1 is clean: writes table 2
    EXPECT_EQ(mem_->active, 2);
    mem_->release();
    run(join(&scope));
    ASSERT_TRUE(st1.ok()) << st1.error().message();
    ASSERT_TRUE(st2.ok()) << st2.error().message();
    EXPECT_TRUE(on_disk(1 * kTable, 0x31));
    EXPECT_TRUE(on_disk(2 * kTable, 0x32));
    EXPECT_FALSE(cache.has_dirty());
    // And it does not heal: there is nothing left to write.
    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_FALSE(cache.has_dirty());
}

// ---- create, forget, clear, configure ----

TEST_F(TableCacheTest, CreateGivesAZeroFilledDirtyTableWithoutReading) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    // Leave a freed buffer with non-zero bytes behind for the allocator to hand out again.
    ASSERT_TRUE(get(&cache, 6 * kTable).ok());
    cache.forget(6 * kTable);
    const uint64_t requests = mem_->requests;

    Ref r = cache.create(2 * kTable);
    ASSERT_TRUE(r);
    EXPECT_EQ(r.offset(), 2 * kTable);
    EXPECT_TRUE(all_bytes(r.data(), kTable, 0));
    EXPECT_TRUE(cache.has_dirty());
    EXPECT_EQ(mem_->requests, requests);
    r.reset();

    auto again = get(&cache, 2 * kTable);  // a hit: the disk's bytes are not read over it
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(all_bytes(again->data(), kTable, 0));
    EXPECT_EQ(mem_->requests, requests);
    again->reset();

    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_TRUE(on_disk(2 * kTable, 0));
    EXPECT_FALSE(cache.has_dirty());
}

TEST_F(TableCacheTest, ForgetAndClearDropTables) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    ASSERT_TRUE(get(&cache, 1 * kTable).ok());
    { Ref r = cache.create(2 * kTable); }
    EXPECT_TRUE(cache.has_dirty());
    cache.forget(2 * kTable);  // its cluster was freed: the change is dropped, not written
    EXPECT_FALSE(cache.has_dirty());
    EXPECT_FALSE(cached(&cache, 2 * kTable));
    cache.forget(9 * kTable);  // not cached: nothing happens
    EXPECT_EQ(cache.size(), 1U);
    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok());
    EXPECT_TRUE(on_disk(2 * kTable, disk_byte(2 * kTable)));

    ASSERT_TRUE(get(&cache, 3 * kTable).ok());
    cache.clear();
    EXPECT_EQ(cache.size(), 0U);
    EXPECT_FALSE(cached(&cache, 1 * kTable));
    const uint64_t requests = mem_->requests;
    ASSERT_TRUE(get(&cache, 1 * kTable).ok());  // read again
    EXPECT_EQ(mem_->requests, requests + 1);
}

// clear() with a table still pinned (a reader not drained, which callers rule out): the
// holder's bytes stay valid until it lets go, and the cache reads the table afresh.
TEST_F(TableCacheTest, ClearLeavesAPinnedTableToItsHolder) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    auto held = get(&cache, 3 * kTable);
    ASSERT_TRUE(held.ok());
    ASSERT_TRUE(get(&cache, 4 * kTable).ok());
    cache.clear();
    EXPECT_EQ(cache.size(), 0U);
    EXPECT_FALSE(cached(&cache, 3 * kTable));
    EXPECT_EQ(held->data()[0], disk_byte(3 * kTable));  // still readable (ASan would object)
    const uint64_t requests = mem_->requests;
    ASSERT_TRUE(get(&cache, 3 * kTable).ok());
    EXPECT_EQ(mem_->requests, requests + 1);
}

// A table forgotten while a holder still uses it (a read that mapped through it before its
// cluster was freed): the holder keeps valid bytes, but the cache no longer gives them out,
// so a new table at that offset starts from the disk, and the dropped change is never written.
TEST_F(TableCacheTest, AForgottenPinnedTableIsNeverHandedOutAgain) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    auto held = get(&cache, 3 * kTable);
    ASSERT_TRUE(held.ok());
    std::memset(held->data(), 0x77, kTable);
    cache.mark_dirty(*held);
    cache.forget(3 * kTable);
    EXPECT_FALSE(cache.has_dirty());
    EXPECT_TRUE(all_bytes(held->data(), kTable, 0x77)) << "the holder's bytes changed";
    EXPECT_FALSE(cached(&cache, 3 * kTable));

    mem_->data[3 * kTable] = 0x5a;  // the cluster was reused and written meanwhile
    const uint64_t requests = mem_->requests;
    auto fresh = get(&cache, 3 * kTable);
    ASSERT_TRUE(fresh.ok());
    EXPECT_EQ(mem_->requests, requests + 1) << "served from the forgotten table";
    EXPECT_EQ(fresh->data()[0], 0x5a);
    EXPECT_TRUE(all_bytes(held->data(), kTable, 0x77));
    held->reset();
    fresh->reset();
    Status st = run(cache.write_dirty(file_));
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(mem_->data[3 * kTable + 1], disk_byte(3 * kTable))
        << "the dropped change was written";
    EXPECT_EQ(cache.size(), 1U);
}

// Forgotten while its read is in flight: a get after the forget reads the disk for itself,
// and the first read failing then takes only its own entry away, never the new one.
TEST_F(TableCacheTest, ATableForgottenWhileLoadingIsReadAgain) {
    auto gate = std::make_shared<GateNode>(env(), 1 << 20);
    Child* file = use_rw(gate)->root();
    ASSERT_NE(file, nullptr);
    TableCache cache(loop_.get(), kTable, 8, kKind);
    std::optional<Result<Ref>> first;
    std::optional<Result<Ref>> second;
    TaskScope scope(loop_.get());
    gate->hold();
    scope.spawn(get_into(&cache, file, 2 * kTable, &first));
    EXPECT_EQ(gate->reads, 1U);
    cache.forget(2 * kTable);
    scope.spawn(get_into(&cache, file, 2 * kTable, &second));
    EXPECT_EQ(gate->reads, 2U) << "the get after the forget waited for the forgotten read";
    gate->fail_next = EIO;  // the first read (woken first) fails
    gate->release();
    run(join(&scope));

    ASSERT_TRUE(first && second);
    EXPECT_FALSE(first->ok());
    ASSERT_TRUE(second->ok()) << second->error().message();
    second->value().reset();
    EXPECT_EQ(cache.size(), 1U);
    EXPECT_TRUE(cached(&cache, 2 * kTable));
}

// A get waiting for another's read of a table that is forgotten meanwhile (its cluster was
// freed by a write that moved the table): it must not read the freed cluster into the cache
// again, where the next table allocated there would find it. It fails with kStale so its
// caller looks the table's place up again. So does the reader that started the read: the
// cluster may have been reused and written before its read completed, and it kept that.
TEST_F(TableCacheTest, AWaiterOfAForgottenTableIsToldToLookAgain) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    TwoGets gets;
    two_gets_across_a_forget(&cache, 5 * kTable, 5 * kTable, &gets);
    ASSERT_FALSE(gets.loader->ok()) << "the loader kept a table freed under its read";
    EXPECT_EQ(gets.loader->error().errnum, TableCache::kStale);
    ASSERT_FALSE(gets.waiter->ok());
    EXPECT_EQ(gets.waiter->error().errnum, TableCache::kStale);
    EXPECT_EQ(gets.reads, 1U) << "the waiter read the freed table again";
    EXPECT_FALSE(cached(&cache, 5 * kTable));
}

// A forget counts even for a table that is not cached: the read a get waits for may have
// failed, or its table may have been evicted since, and the forgotten table could be the one
// the get wants.
TEST_F(TableCacheTest, AForgetOfAnUncachedTableAlsoSendsWaitersBack) {
    TableCache cache(loop_.get(), kTable, 8, kKind);
    TwoGets gets;
    two_gets_across_a_forget(&cache, 5 * kTable, 9 * kTable, &gets);  // 9: not cached
    EXPECT_TRUE(gets.loader->ok());
    ASSERT_FALSE(gets.waiter->ok());
    EXPECT_EQ(gets.waiter->error().errnum, TableCache::kStale);
    gets.loader->value().reset();
}

TEST_F(TableCacheTest, ConfigureSetsTableSizeAndCapacity) {
    TableCache cache(loop_.get(), 512, 0, kKind);
    EXPECT_EQ(cache.capacity(), 2U);  // never below 2
    cache.configure(kTable, 5);
    EXPECT_EQ(cache.capacity(), 5U);
    auto r = get(&cache, 3 * kTable);
    ASSERT_TRUE(r.ok());
    // The whole table was read: the last byte is the table's, not left over.
    EXPECT_EQ(r->data()[kTable - 1], disk_byte(3 * kTable));
    Ref created = cache.create(4 * kTable);
    EXPECT_TRUE(all_bytes(created.data(), kTable, 0));
}

}  // namespace
}  // namespace imgfs
