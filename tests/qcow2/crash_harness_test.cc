// Crash harness for the qcow2 driver (issue 6, item 3).
//
// A RecorderNode between the qcow2 node and its file records every write, zeroing, discard and
// truncate, and which flushes completed (tests/qcow2/recorder_util.h). The workload runs once;
// then every request it issued is a crash point, and each crash point yields four variants of the
// file: every unflushed request dropped, a prefix of them kept, a random subset kept, and a torn
// write (one multi-sector write partly applied at 512-byte sectors, the ones before it kept, a
// random subset of the later ones). Identical states are tested once; each distinct variant is one
// counted point. For every point:
//  * our checker (check_qcow2, which counts references and compares refcounts as qemu-img check
//    does) finds no corruption (leaks are allowed). `qemu-img check` costs 20-50 ms, so it runs on
//    a sample only: every Nth point, and it must agree with our checker there;
//  * a read-write reopen works (repairing a dirty lazy-refcounts image) and every byte the guest
//    had flushed before the crash reads back;
//  * then a second crash during that recovery: the reopen's own writes (repair, autoclear, dirty
//    bit) plus a few guest writes and a flush are recorded, a random point of them is taken with a
//    random variant, and that image too must check clean, reopen, keep the flushed bytes, and
//    close clean (the closed image is also checked by qemu-img on the sample).
// Workloads: allocating writes, zero-writes, discards, a grow, with 512-byte clusters so that L2
// tables and refcount blocks are allocated all the time: 1-bit refcounts (several refcount
// blocks), 64-bit refcounts (the refcount table grows), and 16-bit with lazy_refcounts (dirty-bit
// repair on reopen). Scale: rounds with new seeds run until the point target is met; IMGFS_LONG=1
// raises the target (>= 100,000 points in all), IMGFS_CRASH_STRIDE=N keeps every Nth crash point
// (the sanitizer build). Each test prints one summary line.
#include <chrono>
#include <cstdlib>
#include <fcntl.h>
#include <random>

#include <gtest/gtest.h>

#include "core/task_scope.h"
#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/file.h"
#include "drivers/qcow2/qcow2_node.h"
#include "qcow2/image_test_util.h"
#include "qcow2/recorder_util.h"

namespace imgfs {
namespace {

using test::Clock;
using test::CrashView;
using test::Journal;
using test::RecordedOp;
using test::Variant;

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kGuestBytes = 6 * kMiB;

struct Config {
    const char* name;
    int refcount_bits;
    bool lazy;
    uint64_t ci_points;       // the target without IMGFS_LONG (before the stride)
    bool concurrent = false;  // batches of requests in flight at once, with injected faults
};

void PrintTo(const Config& c, std::ostream* os) {
    *os << c.name;
}

struct WorkOp {
    enum Kind { kWrite, kZero, kDiscard, kFlush, kGrow } kind;
    uint64_t offset = 0;
    uint64_t bytes = 0;
    uint8_t seed = 0;
};

// A few large writes first (new refcount blocks; with 64-bit refcounts a bigger refcount
// table), then scattered small ops that allocate L2 tables, zero, discard, and a grow.
std::vector<WorkOp> workload(uint64_t seed, const Config& c) {
    std::mt19937_64 rng(seed);
    std::vector<WorkOp> ops;
    const int big = c.refcount_bits == 64 ? 3 : 2;
    for (int i = 0; i < big; ++i) {
        ops.push_back({WorkOp::kWrite, (uint64_t(i) * 2 + 1) * kMiB - rng() % 4096,
                       700 * 1024 + rng() % 4096, static_cast<uint8_t>(rng())});
        ops.push_back({WorkOp::kFlush});
    }
    const int count = c.refcount_bits == 64 ? 14 : 28;
    for (int i = 0; i < count; ++i) {
        if (i == count / 2) {
            ops.push_back({WorkOp::kGrow, kGuestBytes + 2 * kMiB});
        }
        if (i % 6 == 5) {
            ops.push_back({WorkOp::kFlush});
            continue;
        }
        WorkOp op{};
        int r = static_cast<int>(rng() % 10);
        op.kind = r < 6 ? WorkOp::kWrite : r < 8 ? WorkOp::kZero : WorkOp::kDiscard;
        op.bytes = 1 + rng() % (rng() % 4 == 0 ? 48 * 1024 : 5000);
        op.offset = rng() % (kGuestBytes - op.bytes);
        op.seed = static_cast<uint8_t>(rng());
        ops.push_back(op);
    }
    ops.push_back({WorkOp::kFlush});
    return ops;
}

void fill(const WorkOp& op, std::vector<uint8_t>* out) {
    out->resize(op.bytes);
    for (size_t i = 0; i < op.bytes; ++i) {
        (*out)[i] = static_cast<uint8_t>(op.seed ^ (i * 13) ^ (i >> 8));
    }
}

// One guest request as the workload issued it, with the content it left (for discards: what
// the range read afterwards).
struct GuestEvent {
    WorkOp op;
    std::vector<uint8_t> data;
    uint64_t issued = 0;
    uint64_t done = UINT64_MAX;  // flushes: only if they succeeded
    bool failed = false;         // concurrent workload: the request returned an error
};

Task<Status> run_one(Qcow2Node* node, WorkOp op, GuestEvent* ev) {
    switch (op.kind) {
        case WorkOp::kWrite:
            fill(op, &ev->data);
            co_return co_await node->write(op.offset, ev->data);
        case WorkOp::kZero:
            ev->data.assign(op.bytes, 0);
            co_return co_await node->write_zeroes(op.offset, op.bytes, true);
        case WorkOp::kDiscard:
            CO_TRY(co_await node->discard(op.offset, op.bytes));
            ev->data.resize(op.bytes);
            co_return co_await node->read(op.offset, ev->data);
        case WorkOp::kFlush:
            co_return co_await node->flush();
        case WorkOp::kGrow:
            co_return co_await node->truncate(op.offset);
    }
    co_return Status{};
}

Task<Status> run_workload(Qcow2Node* node, Clock* clock, std::vector<WorkOp> ops,
                          std::vector<GuestEvent>* events) {
    for (const WorkOp& op : ops) {
        GuestEvent ev;
        ev.op = op;
        ev.issued = clock->next();
        CO_TRY(co_await run_one(node, op, &ev));
        ev.done = clock->next();
        events->push_back(std::move(ev));
    }
    co_return Status{};
}

// What the guest may expect after a crash at a given clock value: `flushed()` is the content
// guaranteed by completed guest flushes, except for the bytes marked in `dirty()` (changed since,
// or by a request that failed). A dirty byte may hold its flushed value or what one of the
// `unsettled()` requests touching it put there (zeros for zeroing and discards): old or new,
// never a third value such as another offset's data.
class DurableModel {
  public:
    virtual ~DurableModel() = default;
    virtual void seek(uint64_t s) = 0;
    [[nodiscard]] virtual bool size_ok(uint64_t size) const = 0;
    [[nodiscard]] virtual const std::vector<uint8_t>& flushed() const = 0;
    [[nodiscard]] virtual const std::vector<uint8_t>& dirty() const = 0;
    [[nodiscard]] virtual std::vector<const GuestEvent*> unsettled() const = 0;
};

// The serial workload: requests one at a time, none failing.
class GuestModel final : public DurableModel {
  public:
    explicit GuestModel(const std::vector<GuestEvent>* events)
        : events_(events),
          model_(kGuestBytes, 0),
          flushed_(kGuestBytes, 0),
          dirty_(kGuestBytes, 0) {}

    void seek(uint64_t s) override {
        for (; next_ < events_->size() && (*events_)[next_].issued < s; ++next_) {
            const GuestEvent& ev = (*events_)[next_];
            if (ev.op.kind == WorkOp::kFlush) {
                if (ev.done >= s) {
                    break;  // still in flight: nothing new is durable
                }
                flushed_ = model_;
                flushed_size_ = model_.size();
                std::fill(dirty_.begin(), dirty_.end(), 0);
                since_flush_ = next_ + 1;
            } else if (ev.op.kind == WorkOp::kGrow) {
                model_.resize(ev.op.offset, 0);
                flushed_.resize(ev.op.offset, 0);
                dirty_.resize(ev.op.offset, 1);
                grow_pending_ = ev.op.offset;
            } else {
                auto at = static_cast<std::ptrdiff_t>(ev.op.offset);
                std::copy(ev.data.begin(), ev.data.end(), model_.begin() + at);
                std::fill_n(dirty_.begin() + at, ev.op.bytes, 1);
            }
        }
    }
    [[nodiscard]] bool size_ok(uint64_t size) const override {
        return size == flushed_size_ || size == grow_pending_;
    }
    [[nodiscard]] const std::vector<uint8_t>& flushed() const override { return flushed_; }
    [[nodiscard]] const std::vector<uint8_t>& dirty() const override { return dirty_; }
    [[nodiscard]] std::vector<const GuestEvent*> unsettled() const override {
        std::vector<const GuestEvent*> out;
        for (size_t i = since_flush_; i < next_; ++i) {
            out.push_back(&(*events_)[i]);
        }
        return out;
    }

  private:
    const std::vector<GuestEvent>* events_;
    size_t next_ = 0;
    size_t since_flush_ = 0;
    std::vector<uint8_t> model_;
    std::vector<uint8_t> flushed_;
    std::vector<uint8_t> dirty_;
    uint64_t flushed_size_ = kGuestBytes;
    uint64_t grow_pending_ = kGuestBytes;
};

// The concurrent workload: batches of requests in flight at once (disjoint ranges within a
// batch), some failing. A guest flush covers the requests that had completed when it was
// issued; at a crash every byte holds what the last covered request touching it left, unless
// that request failed or was a discard (unknown), or a later request touching it had been
// issued by then (old or new). Requests on one byte are never concurrent, so the covered ones
// all come before the uncovered ones.
class ConcurrentModel final : public DurableModel {
  public:
    explicit ConcurrentModel(const std::vector<GuestEvent>* events)
        : events_(events), flushed_(kGuestBytes, 0), dirty_(kGuestBytes, 0) {}

    void seek(uint64_t s) override {
        uint64_t cut = 0;
        for (const GuestEvent& ev : *events_) {
            if (ev.op.kind == WorkOp::kFlush && !ev.failed && ev.done < s) {
                cut = std::max(cut, ev.issued);
            }
        }
        std::fill(flushed_.begin(), flushed_.end(), 0);
        std::fill(dirty_.begin(), dirty_.end(), 0);
        unsettled_.clear();
        for (const GuestEvent& ev : *events_) {
            if (ev.issued >= s) {
                break;
            }
            if (ev.op.kind == WorkOp::kFlush) {
                continue;
            }
            auto at = static_cast<std::ptrdiff_t>(ev.op.offset);
            bool covered = ev.done < cut;
            bool known = covered && !ev.failed && ev.op.kind != WorkOp::kDiscard;
            if (known) {
                if (ev.op.kind == WorkOp::kWrite) {
                    std::copy(ev.data.begin(), ev.data.end(), flushed_.begin() + at);
                } else {
                    std::fill_n(flushed_.begin() + at, ev.op.bytes, 0);
                }
            } else {
                unsettled_.push_back(&ev);
            }
            std::fill_n(dirty_.begin() + at, ev.op.bytes, known ? 0 : 1);
        }
    }
    [[nodiscard]] bool size_ok(uint64_t size) const override { return size == kGuestBytes; }
    [[nodiscard]] const std::vector<uint8_t>& flushed() const override { return flushed_; }
    [[nodiscard]] const std::vector<uint8_t>& dirty() const override { return dirty_; }
    [[nodiscard]] std::vector<const GuestEvent*> unsettled() const override { return unsettled_; }

  private:
    const std::vector<GuestEvent>* events_;
    std::vector<const GuestEvent*> unsettled_;
    std::vector<uint8_t> flushed_;
    std::vector<uint8_t> dirty_;
};

// One request of the concurrent workload, stamped when issued and when done.
Task<void> run_stamped(Qcow2Node* node, Clock* clock, GuestEvent* ev) {
    ev->issued = clock->next();
    Status st;
    switch (ev->op.kind) {
        case WorkOp::kWrite:
            st = co_await node->write(ev->op.offset, ev->data);
            break;
        case WorkOp::kZero:
            st = co_await node->write_zeroes(ev->op.offset, ev->op.bytes, ev->op.seed % 2 == 0);
            break;
        case WorkOp::kDiscard:
            st = co_await node->discard(ev->op.offset, ev->op.bytes);
            break;
        default:
            st = co_await node->flush();
            break;
    }
    ev->done = clock->next();
    ev->failed = !st;
}

// A batch of disjoint requests inside a small window (so they share clusters, L2 tables and
// refcount blocks), issued at once.
std::vector<GuestEvent> make_batch(std::mt19937_64* rng) {
    const uint64_t window = 256 * 1024;
    const uint64_t base = (*rng)() % (kGuestBytes - window);
    std::vector<GuestEvent> batch;
    std::vector<std::pair<uint64_t, uint64_t>> taken;
    const int n = 4 + static_cast<int>((*rng)() % 20);
    for (int i = 0; i < n; ++i) {
        GuestEvent ev;
        int r = static_cast<int>((*rng)() % 20);
        ev.op.kind = r < 13   ? WorkOp::kWrite
                     : r < 16 ? WorkOp::kZero
                     : r < 18 ? WorkOp::kDiscard
                              : WorkOp::kFlush;
        ev.op.seed = static_cast<uint8_t>((*rng)());
        if (ev.op.kind != WorkOp::kFlush) {
            ev.op.bytes = 1 + (*rng)() % ((*rng)() % 4 == 0 ? 20000 : 3000);
            ev.op.offset = base + (*rng)() % (window - ev.op.bytes);
            uint64_t a = ev.op.offset;
            uint64_t b = a + ev.op.bytes;
            if (std::any_of(taken.begin(), taken.end(),
                            [a, b](const auto& t) { return a < t.second && t.first < b; })) {
                continue;
            }
            taken.emplace_back(a, b);
            if (ev.op.kind == WorkOp::kWrite) {
                fill(ev.op, &ev.data);
            }
        }
        batch.push_back(std::move(ev));
    }
    return batch;
}

Task<Status> run_concurrent(Qcow2Node* node, FaultNode* faults, EventLoop* loop, Clock* clock,
                            uint64_t seed, std::vector<GuestEvent>* events) {
    std::mt19937_64 rng(seed);
    const int batches = 5;
    for (int b = 0; b <= batches; ++b) {
        std::vector<GuestEvent> batch = make_batch(&rng);
        faults->clear_rules();
        faults->set_seed(rng());
        faults->set_jitter(b < batches ? 3 : 0);
        if (b < batches) {  // the last batch runs without faults and ends with a flush
            FaultRule err;
            err.errnum = b % 2 == 0 ? ENOSPC : EIO;
            err.probability = 0.12;
            faults->add_rule(err);
            FaultRule cut = err;
            cut.ops = fault_op::kWrite | fault_op::kWriteZeroes;
            cut.action = FaultAction::kShort;
            cut.probability = 0.06;
            faults->add_rule(cut);
        } else {
            batch.emplace_back();
            batch.back().op.kind = WorkOp::kFlush;
        }
        {
            TaskScope scope(loop);
            for (GuestEvent& ev : batch) {
                scope.spawn(run_stamped(node, clock, &ev));
            }
            co_await scope.join();
        }
        for (GuestEvent& ev : batch) {
            events->push_back(std::move(ev));
        }
    }
    faults->clear_rules();
    if (events->back().failed) {
        co_return make_error(EIO, "the final flush without faults failed");
    }
    co_return Status{};
}

// Ranges written during recovery: not required to survive the second crash.
struct Range {
    uint64_t offset;
    uint64_t bytes;
};

Task<Status> verify_durable(Node* node, const DurableModel* g, std::vector<Range> extra_dirty) {
    if (!g->size_ok(node->size())) {
        co_return make_error(EIO, "virtual size is {}, not the flushed or the grown size",
                             node->size());
    }
    CO_TRY_ASSIGN(std::vector<uint8_t> got, co_await test::read_all(node));
    const auto& want = g->flushed();
    const auto& dirty = g->dirty();
    auto in_extra = [&extra_dirty](uint64_t i) {
        return std::any_of(extra_dirty.begin(), extra_dirty.end(),
                           [i](const Range& r) { return i >= r.offset && i < r.offset + r.bytes; });
    };
    const size_t n = std::min(want.size(), got.size());
    // Dirty bytes that changed: each must be what an unsettled request touching it wrote.
    std::vector<uint64_t> changed;
    for (size_t i = 0; i < n; ++i) {
        if (got[i] == want[i] || in_extra(i)) {
            continue;
        }
        if (dirty[i] == 0) {
            co_return make_error(EIO, "flushed byte at {} reads {:#x}, expected {:#x}", i, got[i],
                                 want[i]);
        }
        changed.push_back(i);
    }
    std::vector<uint8_t> explained(changed.size(), 0);
    for (const GuestEvent* e : g->unsettled()) {
        const bool data = e->op.kind == WorkOp::kWrite || !e->data.empty();
        auto it = std::lower_bound(changed.begin(), changed.end(), e->op.offset);
        for (; it != changed.end() && *it < e->op.offset + e->op.bytes; ++it) {
            uint64_t i = *it;
            explained[it - changed.begin()] |= got[i] == (data ? e->data[i - e->op.offset] : 0);
        }
    }
    for (size_t k = 0; k < changed.size(); ++k) {
        if (explained[k] == 0) {
            co_return make_error(EIO,
                                 "unflushed byte at {} reads {:#x}: neither its flushed value "
                                 "{:#x} nor anything written there since",
                                 changed[k], got[changed[k]], want[changed[k]]);
        }
    }
    co_return Status{};
}

struct Tally {
    uint64_t points = 0;
    uint64_t second = 0;
    uint64_t failures = 0;
    uint64_t qemu_checked = 0;
    uint64_t qemu_leak_disagreements = 0;
    uint64_t dirty_images = 0;
};

class CrashHarness : public test::LoopTest, public ::testing::WithParamInterface<Config> {
  protected:
    // An open qcow2 node over in-memory storage (optionally recorded), with a backend that
    // gives its edges write permission.
    struct Opened {
        std::shared_ptr<test::VecNode> storage;
        std::shared_ptr<Qcow2Node> node;
        std::unique_ptr<BlockBackend> user;
    };
    Result<Opened> open_mem(std::vector<uint8_t> bytes, Clock* clock, Journal* journal);
    void drop(Opened* o);

    void record_round(const std::string& pristine, uint64_t seed, Journal* journal,
                      std::vector<GuestEvent>* events, Clock* clock);
    // Checks one crash state; returns an empty string or what went wrong.
    std::string verify(const std::vector<uint8_t>& image, const DurableModel& g, bool qemu,
                       std::mt19937_64* rng, Tally* t);
    std::string second_crash(Opened* o, Clock* clock, Journal* journal, const DurableModel& g,
                             bool qemu, std::mt19937_64* rng, Tally* t);
    std::string qemu_agrees(const std::vector<uint8_t>& image, const test::ImageCheck& ours,
                            Tally* t);

    test::TempDir dir_{test::memory_backed()};
};

Result<CrashHarness::Opened> CrashHarness::open_mem(std::vector<uint8_t> bytes, Clock* clock,
                                                    Journal* journal) {
    Opened o;
    o.storage = std::make_shared<test::VecNode>(env(), "mem", std::move(bytes));
    std::shared_ptr<Node> below = o.storage;
    if (journal != nullptr) {
        journal->initial = o.storage->data;
        Transaction tx(&graph_);
        below = test::RecorderNode::attach(env(), "recorder", &tx, o.storage, clock, journal);
        TRY(tx.commit());
    }
    Transaction tx(&graph_);
    o.node = Qcow2Node::create(env(), "img", &tx, below, qcow2::Options{});
    TRY(tx.commit());
    TRY(run(o.node->load()));
    o.user = std::make_unique<BlockBackend>(loop_.get(), "test");
    Transaction utx(&graph_);
    o.user->attach(&utx, o.node, perm::kConsistentRead | perm::kWrite | perm::kResize,
                   perm::kConsistentRead | perm::kWriteUnchanged);
    TRY(utx.commit());
    return o;
}

// A crash: the node and its caches go without a flush.
void CrashHarness::drop(Opened* o) {
    o->user.reset();
    o->node.reset();
}

void CrashHarness::record_round(const std::string& pristine, uint64_t seed, Journal* journal,
                                std::vector<GuestEvent>* events, Clock* clock) {
    const std::string img = dir_.file("img.qcow2");
    test::must("cp '" + pristine + "' '" + img + "'");
    auto file = FileNode::open(env(), "file", AT_FDCWD, img, {});
    ASSERT_TRUE(file.ok()) << file.error().message();
    auto rec = run(test::RecorderNode::open(env(), "recorder", *file, clock, journal));
    ASSERT_TRUE(rec.ok()) << rec.error().message();
    Transaction tx(&graph_);
    std::shared_ptr<Node> below = *rec;
    std::shared_ptr<FaultNode> faults;
    if (GetParam().concurrent) {
        // Injected failures never reach the recorder; a short write's first part does.
        faults = FaultNode::open(env(), "faults", &tx, below);
        below = faults;
    }
    auto node = Qcow2Node::create(env(), "img", &tx, below, qcow2::Options{});
    ASSERT_TRUE(tx.commit().ok());
    ASSERT_TRUE(run(node->load()).ok());
    use_rw(node);
    Status st =
        faults != nullptr
            ? run(run_concurrent(node.get(), faults.get(), loop_.get(), clock, seed, events))
            : run(run_workload(node.get(), clock, workload(seed, GetParam()), events));
    ASSERT_TRUE(st.ok()) << st.error().message();
    users_.clear();  // crash at the end too: no close
}

std::string CrashHarness::qemu_agrees(const std::vector<uint8_t>& image,
                                      const test::ImageCheck& ours, Tally* t) {
    const std::string path = dir_.file("point.qcow2");
    test::write_file(path, image);
    test::CheckResult q = test::qemu_check(path);
    ++t->qemu_checked;
    bool qemu_clean =
        q.corruptions == 0 && q.check_errors == 0 && (q.exit_code == 0 || q.exit_code == 3);
    if (qemu_clean != (ours.corruptions == 0)) {
        return "qemu-img check and our checker disagree (ours: " +
               std::to_string(ours.corruptions) + " corruptions, " + ours.first_problem + "):\n" +
               q.output;
    }
    if (q.leaks != ours.leaks) {
        ++t->qemu_leak_disagreements;
    }
    return qemu_clean ? "" : "qemu-img check:\n" + q.output;
}

std::string CrashHarness::verify(const std::vector<uint8_t>& image, const DurableModel& g,
                                 bool qemu, std::mt19937_64* rng, Tally* t) {
    test::ImageCheck c = test::check_qcow2(image);
    if (c.corruptions != 0) {
        return "after the crash: " + c.first_problem;
    }
    t->dirty_images += c.dirty ? 1 : 0;
    if (qemu && !c.dirty) {  // a dirty image is checked once the reopen repaired it
        if (std::string e = qemu_agrees(image, c, t); !e.empty()) {
            return e;
        }
    }
    Clock clock;
    Journal journal;
    Result<Opened> o = open_mem(image, &clock, &journal);
    if (!o) {
        return "reopen: " + o.error().message();
    }
    Status st = run(verify_durable(o->node.get(), &g, {}));
    if (!st) {
        drop(&*o);
        return "after the reopen: " + st.error().message();
    }
    return second_crash(&*o, &clock, &journal, g, qemu, rng, t);
}

Task<Status> recovery_writes(Qcow2Node* node, uint64_t seed, std::vector<Range>* ranges) {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 3; ++i) {
        if (i == 2) {
            CO_TRY(co_await node->flush());
        }
        WorkOp op{WorkOp::kWrite, 0, 1 + rng() % 3000, static_cast<uint8_t>(rng())};
        op.offset = rng() % (kGuestBytes - op.bytes);
        std::vector<uint8_t> buf;
        fill(op, &buf);
        ranges->push_back({op.offset, op.bytes});
        CO_TRY(co_await node->write(op.offset, buf));
    }
    co_return Status{};
}

std::string CrashHarness::second_crash(Opened* o, Clock* clock, Journal* journal,
                                       const DurableModel& g, bool qemu, std::mt19937_64* rng,
                                       Tally* t) {
    std::vector<Range> ranges;
    Status st = run(recovery_writes(o->node.get(), (*rng)(), &ranges));
    drop(o);
    if (!st) {
        return "writes after the reopen: " + st.error().message();
    }
    // A random point of the recovery (the repair's writes included), or its end.
    const size_t n = journal->ops.size();
    size_t pick = (*rng)() % (n + 1);
    uint64_t s = pick < n ? journal->ops[pick].issued : clock->now() + 1;
    CrashView view(journal);
    view.seek(s);
    auto v = test::kAllVariants[(*rng)() % 4];
    std::vector<uint8_t> image = view.content(view.choose(v, rng));
    ++t->second;
    test::ImageCheck c = test::check_qcow2(image);
    if (c.corruptions != 0) {
        return fmt::format("second crash ({} of recovery point {}): {}", test::variant_name(v),
                           pick, c.first_problem);
    }
    Result<Opened> again = open_mem(std::move(image), nullptr, nullptr);
    if (!again) {
        return "reopen after the second crash: " + again.error().message();
    }
    st = run(verify_durable(again->node.get(), &g, ranges));
    Status closed = run(again->node->close());
    std::vector<uint8_t> final_image = again->storage->data;
    drop(&*again);
    if (!st || !closed) {
        return "after the second crash: " + (st ? closed : st).error().message();
    }
    c = test::check_qcow2(final_image);
    if (c.corruptions != 0 || c.dirty) {
        return "closed after the second crash: " + (c.dirty ? "still dirty" : c.first_problem);
    }
    return qemu ? qemu_agrees(final_image, c, t) : "";
}

// With IMGFS_CRASH_KEEP=DIR, failing crash images are kept there (reproducers).
void keep_failure(const std::vector<uint8_t>& image, const std::string& name) {
    const char* keep = std::getenv("IMGFS_CRASH_KEEP");
    if (keep != nullptr && *keep != '\0') {
        test::write_file(std::string(keep) + "/" + name + ".qcow2", image);
    }
}

TEST_P(CrashHarness, FourVariantsAtEveryWrite) {
    REQUIRE_TOOL("qemu-img");
    const Config& cfg = GetParam();
    const test::CrashScale scale = test::crash_scale();
    const uint64_t target = (scale.long_mode ? 36000 : cfg.ci_points) / scale.stride;
    const uint64_t qemu_every = scale.long_mode ? 97 : 9;
    const std::string pristine = dir_.file("pristine.qcow2");
    test::must(fmt::format(
        "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits={}{} "
        "'{}' {}",
        cfg.refcount_bits, cfg.lazy ? ",lazy_refcounts=on" : "", pristine, kGuestBytes));
    auto started = std::chrono::steady_clock::now();
    Tally t;
    std::mt19937_64 rng(1234);
    uint64_t crash_points = 0;
    // IMGFS_CRASH_FIRST_ROUND=N starts at round N: replays a round a failure message names.
    const char* first_env = std::getenv("IMGFS_CRASH_FIRST_ROUND");
    const uint64_t first_round = first_env != nullptr ? std::strtoull(first_env, nullptr, 10) : 0;
    for (uint64_t round = first_round; t.points < target && round < first_round + 1000; ++round) {
        Clock clock;
        Journal journal;
        std::vector<GuestEvent> events;
        record_round(pristine, 99 + round, &journal, &events, &clock);
        if (HasFatalFailure()) {
            return;
        }
        std::vector<uint64_t> points;
        for (const RecordedOp& op : journal.ops) {
            points.push_back(op.issued);
        }
        points.push_back(clock.now() + 1);
        CrashView view(&journal);
        GuestModel serial(&events);
        ConcurrentModel concurrent(&events);
        DurableModel& guest = cfg.concurrent ? static_cast<DurableModel&>(concurrent) : serial;
        std::unordered_set<std::string> seen;
        for (size_t p = (round * 7) % scale.stride; p < points.size(); p += scale.stride) {
            view.seek(points[p]);
            guest.seek(points[p]);
            ++crash_points;
            for (Variant v : test::kAllVariants) {
                test::Selection sel = view.choose(v, &rng);
                if (!seen.insert(view.key(sel)).second) {
                    continue;  // the same state as one already tested
                }
                ++t.points;
                bool qemu = t.points % qemu_every == 0;
                std::vector<uint8_t> image = view.content(sel);
                std::string err = verify(image, guest, qemu, &rng, &t);
                if (!err.empty() && ++t.failures <= 5) {
                    keep_failure(image, fmt::format("{}-r{}-p{}-{}", cfg.name, round, p,
                                                    test::variant_name(v)));
                    ADD_FAILURE() << cfg.name << " round " << round << ", crash before request "
                                  << p << " of " << points.size() << " (" << view.pending().size()
                                  << " pending), variant " << test::variant_name(v) << ": " << err;
                }
            }
        }
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::printf(
        "crash-harness (%s): %llu points run (4 variants at %llu crash points), %llu "
        "passed, second crash on %llu, qemu-img check on %llu (%llu leak counts "
        "differ), %llu dirty; %.1f s\n",
        cfg.name, static_cast<unsigned long long>(t.points),
        static_cast<unsigned long long>(crash_points),
        static_cast<unsigned long long>(t.points - t.failures),
        static_cast<unsigned long long>(t.second), static_cast<unsigned long long>(t.qemu_checked),
        static_cast<unsigned long long>(t.qemu_leak_disagreements),
        static_cast<unsigned long long>(t.dirty_images), secs);
    EXPECT_EQ(t.failures, 0U);
    EXPECT_GE(t.points, target);
}

INSTANTIATE_TEST_SUITE_P(Qcow2, CrashHarness,
                         ::testing::Values(Config{"refcount_bits_1", 1, false, 800},
                                           Config{"refcount_bits_64", 64, false, 800},
                                           Config{"lazy_refcounts", 16, true, 600},
                                           Config{"concurrent_faults", 16, false, 800, true},
                                           Config{"concurrent_faults_lazy", 16, true, 600, true}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace imgfs
