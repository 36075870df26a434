// Concurrent fault sweep: a disk failing under load. Each case opens a qcow2 layer (over a
// backing file for most configurations) on a real file, with a fault filter between the format
// driver and the file, and runs rounds of many requests at once on neighbouring guest ranges:
// allocating and in-place writes that share clusters and L2 tables, zeroing, discards, reads
// and flushes. The filter fails a random subset of every kind of storage request (data, COW,
// L2 and refcount allocation and write-back, header, flush) with EIO, ENOSPC, EDQUOT or ENOMEM,
// cuts some writes short (part of it lands, then ENOSPC), and holds requests for random scheduler
// turns so that they overtake each other. Some cases fill the "disk": every write past a limit
// fails part way, as a full filesystem does, and later rounds free the space again. Half of
// those use a real limit (RLIMIT_FSIZE: the kernel writes up to it, then fails with EFBIG), so
// the file driver's own handling of a write that fails part way is under test too.
//
// After every round (faults off):
//  * every guest sector whose content is known reads back as the model says (a failed request
//    leaves its own range unknown, never anything else);
//  * the image file, as it is on disk at that moment, has no inconsistency: check_qcow2 counts
//    every reference against the refcounts (a cluster referenced twice or above its refcount, an
//    entry pointing outside the file, a wrong COPIED flag); leaks are allowed;
//  * the driver never reported corruption.
// The last round runs without faults: after all those errors every request must succeed again
// (no remount). Then a flush, a close, qemu-img check on a sample, and a reopen that reads
// everything back. One configuration has tiny caches: every step evicts and writes back, so
// write-backs fail half way and the caches run over their limit with dirty tables. IMGFS_LONG=1
// runs >= 100,000 cases; the sanitizer run a tenth of the CI count (IMGFS_CRASH_STRIDE).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <signal.h>

#include <gtest/gtest.h>
#include <sys/resource.h>

#include "core/backend.h"
#include "core/task_scope.h"
#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/image_chain.h"
#include "drivers/local_store.h"
#include "drivers/qcow2/create.h"
#include "drivers/qcow2/qcow2_node.h"
#include "qcow2/image_test_util.h"
#include "qcow2/recorder_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kSector = 512;
// Model tags per 512-byte sector: the write that put its content there.
constexpr uint32_t kZeroTag = 0;
constexpr uint32_t kBackingTag = 1;
constexpr uint32_t kSnapshotTag = 2;
constexpr uint32_t kFirstWriteTag = 3;
constexpr uint32_t kUnknown = UINT32_MAX;

enum class Backing { kNone, kQcow2, kRaw };

struct Config {
    const char* name;
    uint32_t cluster_size;
    bool extended_l2;
    uint32_t refcount_bits;
    bool lazy;
    uint32_t version;
    Backing backing;
    bool internal_snapshot;
    uint64_t guest_bytes;
    uint64_t ci_cases;
    // The caches' limits (0: the defaults). Tiny caches make every step evict and write back,
    // so write-backs fail mid-way and the caches run over their limit with dirty tables.
    uint64_t l2_cache_bytes = 0;
    uint64_t refcount_cache_bytes = 0;
};

void PrintTo(const Config& c, std::ostream* os) {
    *os << c.name;
}

uint8_t pattern_byte(uint32_t tag, uint64_t sector, uint64_t i) {
    if (tag == kZeroTag) {
        return 0;
    }
    uint64_t x = (uint64_t{tag} * 0x9E3779B97F4A7C15ULL) ^ (sector * 0xC2B2AE3D27D4EB4FULL);
    return static_cast<uint8_t>((x >> ((i % 8) * 8)) ^ (i >> 3) ^ 0x5a);
}

void fill_pattern(uint32_t tag, uint64_t offset, MutBuf out) {
    for (uint64_t i = 0; i < out.size(); ++i) {
        uint64_t pos = offset + i;
        out[i] = pattern_byte(tag, pos / kSector, pos % kSector);
    }
}

// Where requests land: windows at the start and around L2 table boundaries, so that requests
// in flight together share clusters, L2 tables and refcount blocks.
struct Zone {
    uint64_t offset;
    uint64_t bytes;
};

std::vector<Zone> zones_of(const Config& c) {
    const uint64_t entry = c.extended_l2 ? 16 : 8;
    const uint64_t l2_span = uint64_t{c.cluster_size} * (c.cluster_size / entry);
    const uint64_t window = std::min<uint64_t>(c.guest_bytes / 4, 2 * kMiB);
    std::vector<Zone> zones{{0, window}};
    for (uint64_t b = l2_span; b + window / 2 <= c.guest_bytes && zones.size() < 3; b += l2_span) {
        if (b >= window) {
            zones.push_back({b - window / 2, window});
        }
    }
    if (zones.size() == 1 && c.guest_bytes >= 2 * window) {
        zones.push_back({c.guest_bytes - window, window});
    }
    return zones;
}

struct Request {
    enum Kind { kWrite, kZero, kDiscard, kRead, kFlush } kind = kWrite;
    uint64_t offset = 0;
    uint64_t bytes = 0;
    bool may_unmap = false;
    uint32_t tag = 0;
    std::vector<uint8_t> data;  // kWrite: what is written; kRead: what was read
    Status result;
};

Task<void> issue(BlockBackend* be, Request* r) {
    switch (r->kind) {
        case Request::kWrite:
            r->result = co_await be->write(r->offset, r->data);
            break;
        case Request::kZero:
            r->result = co_await be->write_zeroes(r->offset, r->bytes, r->may_unmap);
            break;
        case Request::kDiscard:
            r->result = co_await be->discard(r->offset, r->bytes);
            break;
        case Request::kRead:
            r->data.resize(r->bytes);
            r->result = co_await be->read(r->offset, r->data);
            break;
        case Request::kFlush:
            r->result = co_await be->flush();
            break;
    }
}

Task<void> issue_all(BlockBackend* be, std::vector<Request>* requests, Executor* ex) {
    TaskScope scope(ex);
    for (Request& r : *requests) {
        scope.spawn(issue(be, &r));
    }
    co_await scope.join();
}

// The model: one tag per guest sector.
class GuestModel {
  public:
    GuestModel() = default;
    explicit GuestModel(uint64_t guest_bytes) : tags_(guest_bytes / kSector, kZeroTag) {}
    void set(uint64_t offset, uint64_t bytes, uint32_t tag) {
        std::fill_n(tags_.begin() + static_cast<std::ptrdiff_t>(offset / kSector), bytes / kSector,
                    tag);
    }
    [[nodiscard]] uint32_t at(uint64_t sector) const { return tags_[sector]; }
    // First sector of [offset, offset + got.size()) that disagrees, as a message, or "".
    [[nodiscard]] std::string compare(uint64_t offset, ConstBuf got) const {
        for (uint64_t s = offset / kSector; s < (offset + got.size()) / kSector; ++s) {
            uint32_t tag = tags_[s];
            if (tag == kUnknown) {
                continue;
            }
            const uint8_t* p = got.data() + (s * kSector - offset);
            for (uint64_t i = 0; i < kSector; ++i) {
                if (p[i] != pattern_byte(tag, s, i)) {
                    return fmt::format(
                        "guest byte {:#x} reads {:#x}, the model says tag {} ({:#x})",
                        s * kSector + i, p[i], tag, pattern_byte(tag, s, i));
                }
            }
        }
        return "";
    }

  private:
    std::vector<uint32_t> tags_;
};

struct Tally {
    uint64_t cases = 0;
    uint64_t failed_cases = 0;
    uint64_t requests = 0;
    uint64_t failed_requests = 0;
    uint64_t injected = 0;
    uint64_t full_disk_cases = 0;
    uint64_t qemu_checked = 0;
    uint64_t max_in_flight = 0;
};

// A real file size limit for the process while it lives (a full disk the kernel enforces).
class FileSizeLimit {
  public:
    explicit FileSizeLimit(uint64_t bytes) {
        ::signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of the signal
        rlimit r{bytes, RLIM_INFINITY};
        active_ = bytes != 0 && ::setrlimit(RLIMIT_FSIZE, &r) == 0;
    }
    FileSizeLimit(const FileSizeLimit&) = delete;
    FileSizeLimit& operator=(const FileSizeLimit&) = delete;
    ~FileSizeLimit() {
        if (active_) {
            rlimit r{RLIM_INFINITY, RLIM_INFINITY};
            ::setrlimit(RLIMIT_FSIZE, &r);
        }
    }

  private:
    bool active_ = false;
};

class ConcurrentFaults : public test::LoopTest, public ::testing::WithParamInterface<Config> {
  protected:
    void SetUp() override {
        test::LoopTest::SetUp();
        dir_ = std::make_unique<test::ImageDir>();
    }
    void TearDown() override {
        users_.clear();
        test::LoopTest::TearDown();
    }

    void make_pristine();
    Result<Chain> open_top(bool with_faults);
    std::string run_case(uint64_t seed, Tally* t);
    std::string run_round(BlockBackend* be, std::mt19937_64* rng, int round, bool faults,
                          uint64_t* next_tag, Tally* t);
    std::vector<Request> make_requests(std::mt19937_64* rng, uint64_t* next_tag);
    void set_rules(std::mt19937_64* rng, uint64_t full_at);
    std::string verify(BlockBackend* be, const std::vector<Zone>& ranges);
    std::string check_file(const char* when);

    std::unique_ptr<test::ImageDir> dir_;
    std::vector<uint8_t> pristine_;
    GuestModel initial_;
    GuestModel model_;
    std::vector<Zone> zones_;
    // The filters of the open chain's layers (top first), kept by wrap_file.
    std::vector<std::shared_ptr<FaultNode>> filters_;
    // Case settings.
    double probability_ = 0;
    int errnum_ = EIO;
    enum class Full { kNo, kByFilter, kByKernel } full_disk_ = Full::kNo;
};

Task<Status> write_tags(Node* node, std::vector<Zone> zones, uint32_t tag, uint64_t step,
                        GuestModel* model) {
    for (const Zone& z : zones) {
        for (uint64_t off = z.offset; off < z.offset + z.bytes; off += 2 * step) {
            std::vector<uint8_t> buf(step);
            fill_pattern(tag, off, buf);
            CO_TRY(co_await node->write(off, buf));
            model->set(off, step, tag);
        }
    }
    co_return Status{};
}

void ConcurrentFaults::make_pristine() {
    const Config& c = GetParam();
    zones_ = zones_of(c);
    initial_ = GuestModel(c.guest_bytes);
    qcow2::CreateOptions o;
    o.size = c.guest_bytes;
    o.cluster_size = c.cluster_size;
    o.version = c.version;
    o.refcount_bits = c.refcount_bits;
    o.extended_l2 = c.extended_l2;
    o.lazy_refcounts = c.lazy;
    if (c.backing != Backing::kNone) {
        const bool raw = c.backing == Backing::kRaw;
        const std::string base = raw ? "base.raw" : "base.qcow2";
        if (raw) {
            test::must(fmt::format("truncate -s {} '{}'", c.guest_bytes, dir_->file(base)));
        } else {
            qcow2::CreateOptions b = o;
            b.extended_l2 = false;
            b.lazy_refcounts = false;
            b.refcount_bits = 16;
            auto img = qcow2::build_new_image(b);
            ASSERT_TRUE(img.ok()) << img.error().message();
            test::write_file(dir_->file(base), *img);
        }
        auto chain =
            run(open_chain(env(), LocalDirStore::over(dir_->fd()).get(), base, ChainOptions{}));
        ASSERT_TRUE(chain.ok()) << chain.error().message();
        use_rw(chain->top());
        // Backing data in every other 4 KiB block of the zones.
        Status st = run(write_tags(chain->top().get(), zones_, kBackingTag, 4 * kKiB, &initial_));
        ASSERT_TRUE(st.ok()) << st.error().message();
        users_.clear();
        ASSERT_TRUE(run(close_chain(&*chain)).ok());
        o.backing_file = base;
        o.backing_format = raw ? "raw" : "qcow2";
    }
    auto img = qcow2::build_new_image(o);
    ASSERT_TRUE(img.ok()) << img.error().message();
    test::write_file(dir_->file("top.qcow2"), *img);
    if (c.internal_snapshot) {
        auto chain = run(
            open_chain(env(), LocalDirStore::over(dir_->fd()).get(), "top.qcow2", ChainOptions{}));
        ASSERT_TRUE(chain.ok()) << chain.error().message();
        use_rw(chain->top());
        Status st =
            run(write_tags(chain->top().get(), zones_, kSnapshotTag, c.cluster_size, &initial_));
        ASSERT_TRUE(st.ok()) << st.error().message();
        users_.clear();
        ASSERT_TRUE(run(close_chain(&*chain)).ok());
        chain->layers.clear();  // drops the image locks
        // The tables become shared with the snapshot: the first write to each copies it.
        test::must("qemu-img snapshot -c s1 '" + dir_->file("top.qcow2") + "'");
    }
    pristine_ = test::read_file(dir_->file("top.qcow2"));
}

Result<Chain> ConcurrentFaults::open_top(bool with_faults) {
    filters_.clear();
    ChainOptions o;
    o.qcow2.l2_cache_bytes = GetParam().l2_cache_bytes;
    o.qcow2.refcount_cache_bytes = GetParam().refcount_cache_bytes;
    if (with_faults) {
        o.wrap_file = [this](NodeEnv env, Transaction* tx, std::shared_ptr<Node> file,
                             const std::string& name) -> std::shared_ptr<Node> {
            auto f = FaultNode::open(env, name + " (faults)", tx, std::move(file));
            filters_.push_back(f);
            return f;
        };
    }
    return run(open_chain(env(), LocalDirStore::over(dir_->fd()).get(), "top.qcow2", o));
}

void ConcurrentFaults::set_rules(std::mt19937_64* rng, uint64_t full_at) {
    for (size_t i = 0; i < filters_.size(); ++i) {
        FaultNode* f = filters_[i].get();
        f->clear_rules();
        f->set_seed((*rng)());
        f->set_jitter(3);
        FaultRule err;
        err.errnum = errnum_;
        err.probability = probability_;
        if (i > 0) {
            err.ops = fault_op::kRead;  // a backing layer is only read
            f->add_rule(err);
            continue;
        }
        err.ops = fault_op::kAny;
        f->add_rule(err);
        FaultRule cut = err;
        cut.ops = fault_op::kWrite | fault_op::kWriteZeroes;
        cut.errnum = ENOSPC;
        cut.action = FaultAction::kShort;
        cut.probability = probability_ / 2;
        f->add_rule(cut);
        if (full_at != 0) {
            // The disk is full from there on: writes reaching past it land part way.
            FaultRule full;
            full.ops = fault_op::kAllWrites;
            full.errnum = ENOSPC;
            full.action = FaultAction::kShort;
            full.offset = full_at;
            f->add_rule(full);
        }
    }
}

std::vector<Request> ConcurrentFaults::make_requests(std::mt19937_64* rng, uint64_t* next_tag) {
    const Config& c = GetParam();
    const uint64_t n = 8 + (*rng)() % 41;
    std::map<uint64_t, uint64_t> taken;  // start sector -> end sector
    auto free_range = [&taken](uint64_t a, uint64_t b) {
        auto it = taken.upper_bound(a);
        if (it != taken.begin() && std::prev(it)->second > a) {
            return false;
        }
        return it == taken.end() || it->first >= b;
    };
    std::vector<Request> out;
    for (uint64_t i = 0; i < n; ++i) {
        Request r;
        uint64_t k = (*rng)() % 100;
        r.kind = k < 64   ? Request::kWrite
                 : k < 76 ? Request::kZero
                 : k < 84 ? Request::kDiscard
                 : k < 94 ? Request::kRead
                          : Request::kFlush;
        if (r.kind == Request::kFlush) {
            out.push_back(std::move(r));
            continue;
        }
        uint64_t kind = (*rng)() % 10;
        uint64_t max_sectors = kind < 6 ? 16
                               : kind < 9
                                   ? 2 * c.cluster_size / kSector
                                   : std::min<uint64_t>(4 * c.cluster_size, 4 * kMiB) / kSector;
        uint64_t sectors = 1 + (*rng)() % max_sectors;
        const Zone& z = zones_[(*rng)() % zones_.size()];
        uint64_t zs = z.bytes / kSector;
        sectors = std::min(sectors, zs);
        uint64_t start = z.offset / kSector + (*rng)() % (zs - sectors + 1);
        if ((*rng)() % 4 == 0) {
            // Straddle a cluster boundary.
            uint64_t cs = c.cluster_size / kSector;
            uint64_t b = (start / cs + 1) * cs;
            if (b > sectors / 2 && b - sectors / 2 + sectors <= (z.offset + z.bytes) / kSector &&
                b - sectors / 2 >= z.offset / kSector) {
                start = b - sectors / 2;
            }
        }
        if (!free_range(start, start + sectors)) {
            continue;
        }
        taken[start] = start + sectors;
        r.offset = start * kSector;
        r.bytes = sectors * kSector;
        r.may_unmap = (*rng)() % 2 == 0;
        if (r.kind == Request::kWrite) {
            r.tag = static_cast<uint32_t>((*next_tag)++);
            r.data.resize(r.bytes);
            fill_pattern(r.tag, r.offset, r.data);
        }
        out.push_back(std::move(r));
    }
    return out;
}

std::string ConcurrentFaults::verify(BlockBackend* be, const std::vector<Zone>& ranges) {
    for (const Zone& z : ranges) {
        std::vector<uint8_t> buf(z.bytes);
        Status st = run(be->read(z.offset, buf));
        if (!st) {
            return "read back (faults off): " + st.error().message();
        }
        if (std::string e = model_.compare(z.offset, buf); !e.empty()) {
            return e;
        }
    }
    return "";
}

std::string ConcurrentFaults::check_file(const char* when) {
    test::ImageCheck c = test::check_qcow2(test::read_file(dir_->file("top.qcow2")));
    if (c.corruptions != 0) {
        return fmt::format("{}: the image file is inconsistent ({} problems): {}", when,
                           c.corruptions, c.first_problem);
    }
    return "";
}

std::string ConcurrentFaults::run_round(BlockBackend* be, std::mt19937_64* rng, int round,
                                        bool faults, uint64_t* next_tag, Tally* t) {
    std::vector<Request> requests = make_requests(rng, next_tag);
    // A full disk a little past the current end, for the first rounds.
    uint64_t full_at = 0;
    if (faults && full_disk_ != Full::kNo && round < 3) {
        full_at = std::filesystem::file_size(dir_->file("top.qcow2")) +
                  ((*rng)() % 8) * GetParam().cluster_size + ((*rng)() % 16) * kSector;
    }
    if (faults) {
        set_rules(rng, full_disk_ == Full::kByFilter ? full_at : 0);
    }
    {
        FileSizeLimit limit(full_disk_ == Full::kByKernel ? full_at : 0);
        run(issue_all(be, &requests, loop_.get()));
    }
    for (auto& f : filters_) {
        t->injected += f->fired_total();
        f->clear_rules();
        f->set_jitter(0);
    }
    std::vector<Zone> touched;
    for (Request& r : requests) {
        ++t->requests;
        if (!r.result) {
            ++t->failed_requests;
            if (!faults) {
                return fmt::format("round {} without faults: request at {:#x}+{} failed: {}", round,
                                   r.offset, r.bytes, r.result.error().message());
            }
        }
        if (r.kind == Request::kFlush) {
            continue;
        }
        if (r.kind == Request::kRead) {
            if (r.result) {
                if (std::string e = model_.compare(r.offset, r.data); !e.empty()) {
                    return fmt::format("round {}: a read in flight with the others: {}", round, e);
                }
            }
            continue;
        }
        uint32_t tag = !r.result                   ? kUnknown
                       : r.kind == Request::kWrite ? r.tag
                       : r.kind == Request::kZero  ? kZeroTag
                                                   : kUnknown;  // discard: zero or backing
        model_.set(r.offset, r.bytes, tag);
        touched.push_back({r.offset, r.bytes});
    }
    // The touched ranges and a sample of the rest.
    for (int i = 0; i < 4; ++i) {
        const Zone& z = zones_[(*rng)() % zones_.size()];
        uint64_t bytes = std::min<uint64_t>(z.bytes, 64 * kKiB);
        uint64_t off = z.offset + ((*rng)() % ((z.bytes - bytes) / kSector + 1)) * kSector;
        touched.push_back({off, bytes});
    }
    if (std::string e = verify(be, touched); !e.empty()) {
        return fmt::format("round {}: {}", round, e);
    }
    return check_file(fmt::format("round {}", round).c_str());
}

std::string ConcurrentFaults::run_case(uint64_t seed, Tally* t) {
    std::mt19937_64 rng(seed);
    test::write_file(dir_->file("top.qcow2"), pristine_);
    model_ = initial_;
    static constexpr double kProbabilities[] = {0.01, 0.03, 0.08, 0.15, 0.3};
    static constexpr int kErrnos[] = {EIO, ENOSPC, EDQUOT, ENOMEM};
    probability_ = kProbabilities[rng() % 5];
    errnum_ = kErrnos[rng() % 4];
    uint64_t full = rng() % 6;
    full_disk_ = full == 0 ? Full::kByFilter : full == 1 ? Full::kByKernel : Full::kNo;
    t->full_disk_cases += full_disk_ != Full::kNo ? 1 : 0;
    Result<Chain> chain = open_top(true);
    if (!chain) {
        return "open: " + chain.error().message();
    }
    BlockBackend* be = use_rw(chain->top());
    uint64_t next_tag = kFirstWriteTag;
    const int rounds = 3 + static_cast<int>(rng() % 3);
    std::string err;
    for (int round = 0; round < rounds && err.empty(); ++round) {
        err = run_round(be, &rng, round, round + 1 < rounds, &next_tag, t);
    }
    auto* q = static_cast<Qcow2Node*>(chain->top().get());
    if (err.empty() && q->metadata()->corrupt()) {
        err = "the driver reported corruption";
    }
    t->max_in_flight = std::max(t->max_in_flight, chain->top()->max_in_flight());
    if (err.empty()) {
        if (Status st = run(be->flush()); !st) {
            err = "flush without faults: " + st.error().message();
        }
    }
    users_.clear();
    Status closed = run(close_chain(&*chain));
    chain->layers.clear();  // drops the image locks
    filters_.clear();
    if (!err.empty()) {
        return err;
    }
    if (!closed) {
        return "close: " + closed.error().message();
    }
    if (err = check_file("closed"); !err.empty()) {
        return err;
    }
    if (t->cases % 97 == 0) {
        ++t->qemu_checked;
        test::CheckResult qc = test::qemu_check(dir_->file("top.qcow2"));
        if (qc.corruptions != 0 || qc.check_errors != 0 ||
            (qc.exit_code != 0 && qc.exit_code != 3)) {
            return "qemu-img check:\n" + qc.output;
        }
    }
    // Everything reads back after a reopen.
    Result<Chain> again = open_top(false);
    if (!again) {
        return "reopen: " + again.error().message();
    }
    be = use_rw(again->top());
    err = verify(be, zones_);
    users_.clear();
    (void)run(close_chain(&*again));
    return err.empty() ? "" : "after the reopen: " + err;
}

TEST_P(ConcurrentFaults, ManyRequestsInFlightWithFailures) {
    const Config& c = GetParam();
    if (c.internal_snapshot) {
        REQUIRE_TOOL("qemu-img");
    }
    make_pristine();
    if (HasFatalFailure()) {
        return;
    }
    const test::CrashScale scale = test::crash_scale();
    const uint64_t target = scale.long_mode ? c.ci_cases * 50 : c.ci_cases / scale.stride;
    // IMGFS_FAULT_FIRST_CASE=N starts at case N: replays a case a failure message names.
    const char* first_env = std::getenv("IMGFS_FAULT_FIRST_CASE");
    const uint64_t first = first_env != nullptr ? std::strtoull(first_env, nullptr, 10) : 0;
    auto started = std::chrono::steady_clock::now();
    Tally t;
    for (uint64_t k = first; k < first + target; ++k) {
        ++t.cases;
        std::string err = run_case(1000003 * k + 17, &t);
        if (!err.empty() && ++t.failed_cases <= 3) {
            ADD_FAILURE() << c.name << " case " << k << ": " << err;
        }
        if (t.failed_cases > 3) {
            break;
        }
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::printf(
        "concurrent faults (%s): %llu cases run, %llu passed; %llu requests (%llu failed, %llu "
        "faults injected, up to %llu in flight), %llu cases with a full disk, qemu-img check on "
        "%llu; %.1f s\n",
        c.name, static_cast<unsigned long long>(t.cases),
        static_cast<unsigned long long>(t.cases - t.failed_cases),
        static_cast<unsigned long long>(t.requests),
        static_cast<unsigned long long>(t.failed_requests),
        static_cast<unsigned long long>(t.injected),
        static_cast<unsigned long long>(t.max_in_flight),
        static_cast<unsigned long long>(t.full_disk_cases),
        static_cast<unsigned long long>(t.qemu_checked), secs);
    EXPECT_EQ(t.failed_cases, 0U);
    // What the name promises happened: faults fired, requests failed, many were in flight
    // together, and some cases filled the disk.
    EXPECT_GT(t.injected, 0U);
    EXPECT_GT(t.failed_requests, 0U);
    EXPECT_GE(t.max_in_flight, 8U);
    EXPECT_GT(t.full_disk_cases, 0U);
}

// name, cluster, extended L2, refcount bits, lazy, version, backing, internal snapshot, guest
// size, CI cases[, L2 and refcount cache bytes].
INSTANTIATE_TEST_SUITE_P(Qcow2, ConcurrentFaults,
                         ::testing::Values(Config{"c512_refbits1", 512, false, 1, false, 3,
                                                  Backing::kQcow2, false, 8 * kMiB, 300},
                                           Config{"c4k_refbits64", 4096, false, 64, false, 3,
                                                  Backing::kNone, false, 64 * kMiB, 250},
                                           Config{"c64k_backing", 65536, false, 16, false, 3,
                                                  Backing::kQcow2, false, 1024 * kMiB, 250},
                                           Config{"c64k_extl2_backing", 65536, true, 16, false, 3,
                                                  Backing::kQcow2, false, 1024 * kMiB, 300},
                                           Config{"c64k_raw_backing_v2", 65536, false, 16, false, 2,
                                                  Backing::kRaw, false, 1024 * kMiB, 200},
                                           Config{"c16k_extl2_lazy", 16384, true, 16, true, 3,
                                                  Backing::kQcow2, false, 64 * kMiB, 250},
                                           Config{"c2m_extl2_backing", 2 * 1024 * 1024, true, 16,
                                                  false, 3, Backing::kQcow2, false, 64 * kMiB, 150},
                                           Config{"c2m_backing", 2 * 1024 * 1024, false, 16, false,
                                                  3, Backing::kQcow2, false, 64 * kMiB, 100},
                                           Config{"c4k_internal_snapshot", 4096, false, 16, false,
                                                  3, Backing::kNone, true, 64 * kMiB, 250},
                                           Config{"c512_tiny_caches", 512, false, 16, false, 3,
                                                  Backing::kQcow2, false, 8 * kMiB, 200, 1, 1}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace imgfs
