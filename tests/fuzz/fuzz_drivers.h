// What the libFuzzer targets do with an input (tests/fuzz/fuzz_*.cc), shared with their
// regression test (tests/qcow2/fuzz_regression_test.cc), so that a stored crash input runs
// through exactly the path the fuzzer took. Header-only and free of libFuzzer: the gtest builds
// with gcc too.
//
// The input is hostile, so errors from the code under test are expected and ignored. What the
// sanitizers report, crashes, hangs (sync_wait aborts when nothing can make progress) and
// unbounded memory are the bugs. A driver also returns, as a message, what is wrong even
// without a sanitizer (a header that does not survive its own round trip, L2 helpers that
// contradict each other); empty means nothing was found.
#pragma once

#include <algorithm>
#include <coroutine>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "core/backend.h"
#include "core/event_loop.h"
#include "core/graph.h"
#include "core/log.h"
#include "core/task_scope.h"
#include "core/transaction.h"
#include "drivers/qcow2/format.h"
#include "drivers/qcow2/l2_entry.h"
#include "drivers/qcow2/qcow2_node.h"
#include "drivers/qcow2/snapshot_table.h"
#include "fake_node.h"

namespace imgfs::fuzz {

inline constexpr const char* kImageName = "fuzz.qcow2";

// ---------------------------------------------------------------------------------------------
// fuzz_header: parse_header, serialize_header, parse the result again; parse_snapshot_table.
// ---------------------------------------------------------------------------------------------

namespace detail {

template <typename T>
void compare_field(std::string* out, const char* field, const T& before, const T& after) {
    if (!out->empty() || before == after) {
        return;
    }
    if constexpr (std::is_arithmetic_v<T>) {
        *out = fmt::format("{}: {} became {}", field, before, after);
    } else if constexpr (std::is_enum_v<T>) {
        *out = fmt::format("{}: {} became {}", field, static_cast<int>(before),
                           static_cast<int>(after));
    } else {
        *out = fmt::format("{} changed", field);
    }
}

// The first field in which two headers differ (the informational backing_file_offset/size
// excepted: serialize decides where the name goes), or empty.
inline std::string header_difference(const qcow2::Header& a, const qcow2::Header& b) {
    std::string d;
    compare_field(&d, "version", a.version, b.version);
    compare_field(&d, "cluster_bits", a.cluster_bits, b.cluster_bits);
    compare_field(&d, "size", a.size, b.size);
    compare_field(&d, "crypt_method", a.crypt_method, b.crypt_method);
    compare_field(&d, "l1_size", a.l1_size, b.l1_size);
    compare_field(&d, "l1_table_offset", a.l1_table_offset, b.l1_table_offset);
    compare_field(&d, "refcount_table_offset", a.refcount_table_offset, b.refcount_table_offset);
    compare_field(&d, "refcount_table_clusters", a.refcount_table_clusters,
                  b.refcount_table_clusters);
    compare_field(&d, "nb_snapshots", a.nb_snapshots, b.nb_snapshots);
    compare_field(&d, "snapshots_offset", a.snapshots_offset, b.snapshots_offset);
    compare_field(&d, "incompatible", a.incompatible, b.incompatible);
    compare_field(&d, "compatible", a.compatible, b.compatible);
    compare_field(&d, "autoclear", a.autoclear, b.autoclear);
    compare_field(&d, "refcount_order", a.refcount_order, b.refcount_order);
    compare_field(&d, "header_length", a.header_length, b.header_length);
    compare_field(&d, "compression_type", a.compression_type, b.compression_type);
    compare_field(&d, "unknown_fields", a.unknown_fields, b.unknown_fields);
    compare_field(&d, "backing_file", a.backing_file, b.backing_file);
    // The backing format is kept only with a backing file (serialize drops a stray one).
    if (!a.backing_file.empty()) {
        compare_field(&d, "backing_format", a.backing_format, b.backing_format);
    }
    compare_field(&d, "feature_names (count)", a.feature_names.size(), b.feature_names.size());
    for (size_t i = 0; d.empty() && i < a.feature_names.size(); ++i) {
        const qcow2::FeatureName& x = a.feature_names[i];
        const qcow2::FeatureName& y = b.feature_names[i];
        if (x.type != y.type || x.bit != y.bit || x.name != y.name) {
            d = fmt::format("feature name {} changed", i);
        }
    }
    compare_field(&d, "other_extensions (count)", a.other_extensions.size(),
                  b.other_extensions.size());
    for (size_t i = 0; d.empty() && i < a.other_extensions.size(); ++i) {
        const qcow2::Extension& x = a.other_extensions[i];
        const qcow2::Extension& y = b.other_extensions[i];
        if (x.type != y.type || x.data != y.data) {
            d = fmt::format("extension {} (type {:#x}) changed", i, x.type);
        }
    }
    return d;
}

}  // namespace detail

/// The input is an image's header area (its first cluster). The image it came from was
/// larger: the header is parsed as if the file had the input's length, and 64 Ki times that
/// (so tables past the first cluster can lie inside it).
inline std::string drive_header(ConstBuf input) {
    const uint64_t file_sizes[] = {input.size(), uint64_t{input.size()} << 16};
    qcow2::Header any;  // some accepted header, for the raw snapshot table parse below
    uint64_t any_file_size = file_sizes[1];
    for (uint64_t file_size : file_sizes) {
        Result<qcow2::Header> parsed = qcow2::parse_header(input, file_size, kImageName);
        if (!parsed) {
            continue;
        }
        const qcow2::Header& h = *parsed;
        any = h;
        any_file_size = file_size;
        // Everything derived from an accepted header must be computable.
        qcow2::Geometry g = qcow2::Geometry::from(h);
        (void)g.l1_entries_for(h.size);
        (void)g.l1_index(h.size == 0 ? 0 : h.size - 1);
        (void)h.describe_incompatible(~uint64_t{0});

        qcow2::Header copy = h;
        Result<std::vector<uint8_t>> bytes = qcow2::serialize_header(&copy);
        if (bytes) {
            Result<qcow2::Header> again = qcow2::parse_header(*bytes, file_size, kImageName);
            if (!again) {
                return "the serialised header is refused: " + again.error().message();
            }
            std::string d = detail::header_difference(h, *again);
            if (!d.empty()) {
                return "header round trip: " + d;
            }
        }
        if (h.nb_snapshots != 0 && h.snapshots_offset < input.size()) {
            Result<qcow2::SnapshotTable> t = qcow2::parse_snapshot_table(
                input.subspan(h.snapshots_offset), std::min<uint32_t>(h.nb_snapshots, 64), h,
                file_size, kImageName);
            if (t && t->table_bytes > input.size() - h.snapshots_offset + 7) {
                return fmt::format("snapshot table of {} bytes parsed from {} bytes",
                                   t->table_bytes, input.size() - h.snapshots_offset);
            }
        }
    }
    // The snapshot table parser on the raw bytes as well, with a small count.
    const auto count = static_cast<uint32_t>(1 + input.size() % 8);
    (void)qcow2::parse_snapshot_table(input, count, any, any_file_size, kImageName);
    return {};
}

// ---------------------------------------------------------------------------------------------
// fuzz_l2: the L2 entry helpers. Byte 0 is the geometry (cluster_bits - 9 modulo 13 in bits
// 0..6, extended L2 in bit 7); the rest is an L2 table.
// ---------------------------------------------------------------------------------------------

inline std::string drive_l2(ConstBuf input) {
    if (input.empty()) {
        return {};
    }
    qcow2::Header h;
    h.cluster_bits = qcow2::kMinClusterBits + (input[0] & 0x7fU) % 13;
    if ((input[0] & 0x80U) != 0 && h.cluster_bits >= 14) {
        h.incompatible |= qcow2::kIncompatExtendedL2;
    }
    const qcow2::Geometry g = qcow2::Geometry::from(h);
    const ConstBuf table = input.subspan(1);
    const uint64_t n = std::min<uint64_t>(table.size() / g.l2_entry_bytes, g.l2_entries);
    std::vector<uint8_t> copy(n * g.l2_entry_bytes);
    for (uint64_t i = 0; i < n; ++i) {
        const qcow2::L2Entry e = qcow2::load_l2(g, table.data(), i);
        qcow2::store_l2(g, copy.data(), i, e);
        const char* problem = qcow2::l2_entry_problem(g, e);
        for (uint32_t sc = 0; sc < g.subclusters;) {
            const qcow2::SubclusterType t = qcow2::subcluster_type(g, e, sc);
            const uint32_t run = qcow2::same_type_run(g, e, sc);
            if (run == 0 || run > g.subclusters - sc) {
                return fmt::format("entry {}: same_type_run({}) = {}", i, sc, run);
            }
            for (uint32_t k = 1; k < run; ++k) {
                if (qcow2::subcluster_type(g, e, sc + k) != t) {
                    return fmt::format("entry {}: the run from subcluster {} is mixed", i, sc);
                }
            }
            if (sc + run < g.subclusters && qcow2::subcluster_type(g, e, sc + run) == t) {
                return fmt::format("entry {}: the run from subcluster {} stops early", i, sc);
            }
            if (problem == nullptr && t == qcow2::SubclusterType::kInvalid) {
                return fmt::format(
                    "entry {} ({:#x}, {:#x}) passes l2_entry_problem, but "
                    "subcluster {} is invalid",
                    i, e.word, e.bitmap, sc);
            }
            sc += run;
        }
        if (e.compressed()) {
            const qcow2::CompressedRef c = qcow2::decode_compressed(g, e.word);
            if (c.bytes == 0 || c.bytes > 2 * g.cluster_size) {
                return fmt::format("entry {}: compressed stream of {} bytes", i, c.bytes);
            }
            uint64_t first = 0;
            uint64_t last = 0;
            qcow2::compressed_clusters(g, c, &first, &last);
            if (last < first || last - first > 2) {
                return fmt::format("entry {}: compressed stream over clusters {}..{}", i, first,
                                   last);
            }
        }
    }
    if (!std::equal(copy.begin(), copy.end(), table.begin())) {
        return "store_l2(load_l2()) does not reproduce the table";
    }
    const uint32_t first = input.size() > 1 ? input[1] % 32U : 0;
    const uint32_t count = input.size() > 2 ? input[2] % (33U - first) : 0;
    const uint64_t bits = qcow2::alloc_bits(first, count);
    if (static_cast<uint32_t>(__builtin_popcountll(bits)) != count ||
        qcow2::zero_bits(first, count) != bits << 32) {
        return fmt::format("alloc_bits({}, {}) = {:#x}", first, count, bits);
    }
    return {};
}

// ---------------------------------------------------------------------------------------------
// fuzz_image: a whole image in memory, opened read-write and used.
// ---------------------------------------------------------------------------------------------

/// What happened to an image (for tests and for reading a crash's story).
struct ImageReport {
    bool opened = false;
    std::string open_error;
    int ops = 0;
    int failed_ops = 0;
    std::string first_failure;
    /// Successful writes or zeroings whose range did not read back as written.
    int mismatches = 0;
    std::string first_mismatch;
    bool reopened = false;
};

/// In-memory storage that grows when written past its end, as the file driver does (MemNode
/// has a fixed size), up to `max_size`; beyond that, writes fail with ENOSPC. Discarded ranges
/// read as zeros afterwards (a punched hole).
class GrowableMemNode final : public Node {
  public:
    GrowableMemNode(NodeEnv env, std::string name, std::vector<uint8_t> bytes, uint64_t max_size)
        : Node(env, std::move(name)), data(std::move(bytes)), max_size_(max_size) {
        size_ = data.size();
        caps_.write_zeroes = true;
        caps_.discard = true;
        caps_.resize = true;
    }
    [[nodiscard]] const char* driver_name() const override { return "growable-mem"; }

    std::vector<uint8_t> data;
    /// Every request first goes to the back of the loop's ready queue, as if it waited for
    /// the kernel, so that concurrent requests above interleave.
    bool yield_io = false;

  protected:
    Task<Status> do_read(uint64_t offset, MutBuf buf) override {
        co_await maybe_yield();
        std::memcpy(buf.data(), data.data() + offset, buf.size());
        co_return Status{};
    }
    Task<Status> do_write(uint64_t offset, ConstBuf buf) override {
        co_await maybe_yield();
        CO_TRY(reach(offset + buf.size()));
        std::memcpy(data.data() + offset, buf.data(), buf.size());
        co_return Status{};
    }
    Task<Status> do_write_zeroes(uint64_t offset, uint64_t bytes, bool) override {
        co_await maybe_yield();
        CO_TRY(reach(offset + bytes));
        std::memset(data.data() + offset, 0, bytes);
        co_return Status{};
    }
    Task<Status> do_discard(uint64_t offset, uint64_t bytes) override {
        co_await maybe_yield();
        std::memset(data.data() + offset, 0, bytes);
        co_return Status{};
    }
    Task<Status> do_flush() override {
        co_await maybe_yield();
        co_return Status{};
    }
    Task<Status> do_truncate(uint64_t new_size) override {
        co_await maybe_yield();
        if (new_size > max_size_) {
            co_return make_error(ENOSPC, "{}: {} bytes exceed the limit of {}", name(), new_size,
                                 max_size_);
        }
        data.resize(new_size, 0);
        size_ = new_size;
        co_return Status{};
    }

  private:
    struct Reschedule {
        EventLoop* loop;
        bool skip;
        [[nodiscard]] bool await_ready() const noexcept { return skip; }
        void await_suspend(std::coroutine_handle<> h) const { loop->schedule(h); }
        void await_resume() const noexcept {}
    };
    [[nodiscard]] Reschedule maybe_yield() const { return Reschedule{env_.loop, !yield_io}; }

    Status reach(uint64_t end) {
        if (end <= data.size()) {
            return {};
        }
        if (end > max_size_) {
            return make_error(ENOSPC, "{}: growing to {} bytes exceeds the limit of {}", name(),
                              end, max_size_);
        }
        data.resize(end, 0);
        size_ = end;
        return {};
    }

    uint64_t max_size_;
};

/// Drops the driver's log lines (hostile images make many), or prints them to stderr with
/// IMGFS_FUZZ_VERBOSE set, which helps when replaying one input.
class FuzzLogger final : public Logger {
  public:
    void write(LogLevel level, std::string_view message) override {
        if (verbose()) {
            fmt::print(stderr, "fuzz: {}: {}\n", log_level_name(level), message);
        }
    }
    static bool verbose() {
        static const bool v = std::getenv("IMGFS_FUZZ_VERBOSE") != nullptr;
        return v;
    }
};

/// Parameters for the operations: the input's last bytes (which the fuzzer can change without
/// touching the header; qemu-img images end in tables or data) mixed into a generator seeded
/// from the input's length.
class Control {
  public:
    static constexpr size_t kTailBytes = 64;

    explicit Control(ConstBuf input)
        : tail_(input.last(std::min(input.size(), kTailBytes))),
          state_(0x9e3779b97f4a7c15ULL * (input.size() + 1)) {}

    uint64_t next() {
        state_ += 0x9e3779b97f4a7c15ULL;
        uint64_t z = state_;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        if (pos_ + 1 < tail_.size()) {
            z ^= uint64_t{tail_[pos_]} | (uint64_t{tail_[pos_ + 1]} << 8);
            pos_ += 2;
        }
        return z;
    }
    /// 0 .. n-1 (n > 0).
    uint64_t below(uint64_t n) { return next() % n; }

  private:
    ConstBuf tail_;
    size_t pos_ = 0;
    uint64_t state_;
};

namespace detail {

// Bounds: what one input may make the driver touch, whatever its header claims.
inline constexpr uint64_t kMaxSlackBytes = 4ULL << 20;    // fixed storage past the input's end
inline constexpr uint64_t kMaxGrowthBytes = 48ULL << 20;  // growable storage past the input's end
inline constexpr uint64_t kWindowBytes = 8ULL << 20;      // guest span near the start and the end
inline constexpr uint64_t kMaxIoBytes = 256ULL << 10;     // one read or write
inline constexpr uint64_t kMaxZeroBytes = 2ULL << 20;     // one write_zeroes or discard
inline constexpr uint64_t kFirstReadBytes = 1ULL << 20;   // the first read, from offset 0
inline constexpr int kMaxOps = 20;

// Cluster size as the header claims it (clamped), for offsets and slack.
inline uint64_t claimed_cluster_size(ConstBuf input) {
    uint32_t bits = input.size() >= 24 ? qcow2::load_be32(input.data() + 20) : 16;
    bits = std::clamp(bits, qcow2::kMinClusterBits, qcow2::kMaxClusterBits);
    return uint64_t{1} << bits;
}

// Fills `n` bytes with a pattern in which every 512-byte sector differs (its first 8 bytes
// hold its index and the seed), so data landing in the wrong place does not go unnoticed.
// Built from memcpy rather than a byte loop: instrumented loops over MiBs are slow.
inline void fill_pattern(uint8_t* p, size_t n, uint64_t seed) {
    uint8_t block[4096];
    for (size_t i = 0; i < sizeof(block); ++i) {
        block[i] = static_cast<uint8_t>((seed >> (i % 8)) + i * 7 + 3);
    }
    for (size_t done = 0; done < n; done += sizeof(block)) {
        std::memcpy(p + done, block, std::min(sizeof(block), n - done));
    }
    for (size_t sector = 0; sector * 512 + 8 <= n; ++sector) {
        qcow2::store_be64(p + sector * 512, (sector << 16) ^ seed);
    }
}

struct Range {
    uint64_t offset = 0;
    uint64_t bytes = 0;
};

// A range near the start or (if the image is large) near the end of the guest, aligned to the
// cluster, to 512 bytes or not at all; possibly crossing the end.
inline Range pick_range(Control* c, uint64_t size, uint64_t cluster, uint64_t max_bytes) {
    const uint64_t span = std::max<uint64_t>(std::min(size, kWindowBytes), 1);
    const uint64_t base = size > span && c->below(4) == 0 ? size - span : 0;
    Range r;
    r.offset = base + c->below(span + (c->below(8) == 0 ? 4096 : 0));
    switch (c->below(4)) {
        case 0:
            r.offset &= ~(cluster - 1);
            break;
        case 1:
            r.offset &= ~uint64_t{511};
            break;
        default:
            break;
    }
    switch (c->below(4)) {
        case 0:
            r.bytes = 1 + c->below(512);
            break;
        case 1:
            r.bytes = cluster * (1 + c->below(3));
            break;
        case 2:
            r.bytes = 512 * (1 + c->below(16));
            break;
        default:
            r.bytes = 1 + c->below(max_bytes);
            break;
    }
    r.bytes = std::min(r.bytes, max_bytes);
    return r;
}

// Compares what a range reads now with what was just written there (the part inside the
// node), recording the first difference.
inline void check_readback(ImageReport* report, const char* what, uint64_t offset,
                           const std::vector<uint8_t>& want, const std::vector<uint8_t>& got,
                           uint64_t node_size) {
    const uint64_t valid =
        offset >= node_size ? 0 : std::min<uint64_t>(want.size(), node_size - offset);
    if (valid == 0 || std::memcmp(want.data(), got.data(), valid) == 0) {
        return;
    }
    ++report->mismatches;
    const auto at = static_cast<size_t>(
        std::mismatch(want.begin(), want.begin() + static_cast<std::ptrdiff_t>(valid), got.begin())
            .first -
        want.begin());
    if (report->first_mismatch.empty()) {
        report->first_mismatch =
            fmt::format("{} of {} bytes at {:#x}: byte {:#x} reads {:#x}, not {:#x}", what,
                        want.size(), offset, offset + at, got[at], want[at]);
    }
}

enum class OpKind { kRead, kWrite, kWriteZeroes, kDiscard, kFlush, kBlockStatus, kTruncate };

inline const char* op_name(OpKind k) {
    switch (k) {
        case OpKind::kRead:
            return "read";
        case OpKind::kWrite:
            return "write";
        case OpKind::kWriteZeroes:
            return "write_zeroes";
        case OpKind::kDiscard:
            return "discard";
        case OpKind::kFlush:
            return "flush";
        case OpKind::kBlockStatus:
            return "block_status";
        case OpKind::kTruncate:
            return "truncate";
    }
    return "?";
}

// One operation, drawn before it starts (so that concurrent ones draw in a fixed order).
struct OpSpec {
    int index = 0;
    OpKind kind = OpKind::kRead;
    Range range;  // kTruncate: range.offset is the new size
    uint64_t seed = 0;
    bool may_unmap = false;
    // Read a write or zeroing back afterwards: only when no other operation of its batch
    // could change those bytes meanwhile.
    bool check = false;
};

inline OpSpec draw_op(Control* c, int index, uint64_t size, uint64_t cluster) {
    OpSpec op;
    op.index = index;
    const uint64_t k = c->below(13);
    if (k < 3) {
        op.kind = OpKind::kRead;
        op.range = pick_range(c, size, cluster, kMaxIoBytes);
    } else if (k < 7) {
        op.kind = OpKind::kWrite;
        op.range = pick_range(c, size, cluster, kMaxIoBytes);
        op.seed = c->next();
    } else if (k < 9) {
        op.kind = OpKind::kWriteZeroes;
        op.range = pick_range(c, size, cluster, kMaxZeroBytes);
        op.may_unmap = c->below(2) == 0;
    } else if (k < 10) {
        op.kind = OpKind::kDiscard;
        op.range = pick_range(c, size, cluster, kMaxZeroBytes);
    } else if (k < 11) {
        op.kind = OpKind::kFlush;
    } else if (k < 12) {
        op.kind = OpKind::kBlockStatus;
        op.range = pick_range(c, size, cluster, kMaxZeroBytes);
    } else {  // grow a little (the L1 table may have to grow and move)
        op.kind = OpKind::kTruncate;
        op.range.offset = size + c->below(4) * cluster + c->below(1024);
    }
    return op;
}

inline bool changes_data(const OpSpec& op) {
    return op.kind == OpKind::kWrite || op.kind == OpKind::kWriteZeroes ||
           op.kind == OpKind::kDiscard || op.kind == OpKind::kTruncate;
}

inline bool overlaps(const OpSpec& a, const OpSpec& b) {
    if (a.kind == OpKind::kTruncate || b.kind == OpKind::kTruncate) {
        return true;  // moves the end, which the read-back clips at
    }
    return a.range.offset < b.range.offset + b.range.bytes &&
           b.range.offset < a.range.offset + a.range.bytes;
}

inline Task<void> run_op(BlockBackend* user, Qcow2Node* node, OpSpec op, ImageReport* report) {
    const uint64_t size = node->size();
    const Range r = op.range;
    if (FuzzLogger::verbose()) {
        fmt::print(stderr, "fuzz: op {}: {} {:#x}+{:#x} (size {:#x}) starts\n", op.index,
                   op_name(op.kind), r.offset, r.bytes, size);
    }
    std::vector<uint8_t> buf;
    Status st;
    switch (op.kind) {
        case OpKind::kRead:
            buf.resize(r.bytes);
            st = co_await user->read(r.offset, buf);
            break;
        case OpKind::kWrite: {
            std::vector<uint8_t> data(r.bytes);
            fill_pattern(data.data(), data.size(), op.seed);
            st = co_await user->write(r.offset, data);
            if (st && op.check) {
                buf.resize(r.bytes);
                if (co_await user->read(r.offset, buf)) {
                    check_readback(report, "write", r.offset, data, buf, node->size());
                }
            }
            break;
        }
        case OpKind::kWriteZeroes:
            st = co_await user->write_zeroes(r.offset, r.bytes, op.may_unmap);
            if (st && op.check) {
                buf.resize(r.bytes);
                if (co_await user->read(r.offset, buf)) {
                    check_readback(report, "write_zeroes", r.offset,
                                   std::vector<uint8_t>(r.bytes, 0), buf, node->size());
                }
            }
            break;
        case OpKind::kDiscard:
            st = co_await user->discard(r.offset, r.bytes);
            break;
        case OpKind::kFlush:
            st = co_await user->flush();
            break;
        case OpKind::kBlockStatus: {
            Result<BlockStatus> bs = co_await node->block_status(r.offset, r.bytes);
            if (!bs) {
                st = std::move(bs).error();
            }
            break;
        }
        case OpKind::kTruncate:
            st = co_await user->truncate(r.offset);
            break;
    }
    ++report->ops;
    if (!st) {
        ++report->failed_ops;
        if (report->first_failure.empty()) {
            report->first_failure = fmt::format("{} {:#x}+{:#x}: {}", op_name(op.kind), r.offset,
                                                r.bytes, st.error().message());
        }
    }
    if (FuzzLogger::verbose()) {
        fmt::print(stderr, "fuzz: op {}: {}{}\n", op.index, st ? "ok" : st.error().message(),
                   op.check && st ? " (checked)" : "");
    }
}

// The first read, then batches of one to three operations run concurrently, then a flush.
inline Task<void> run_image_ops(BlockBackend* user, Qcow2Node* node, Control* c,
                                ImageReport* report) {
    const uint64_t cluster = node->header().cluster_size();
    std::vector<uint8_t> buf(std::min(node->size(), kFirstReadBytes));
    ++report->ops;
    if (!(co_await user->read(0, buf))) {
        ++report->failed_ops;
    }
    const int ops = 4 + static_cast<int>(c->below(kMaxOps - 4));
    for (int i = 0; i < ops;) {
        const uint64_t b = c->below(8);
        const int batch = std::min(ops - i, b < 5 ? 1 : b < 7 ? 2 : 3);
        std::vector<OpSpec> specs;
        for (int j = 0; j < batch; ++j) {
            specs.push_back(draw_op(c, i + j, node->size(), cluster));
        }
        for (OpSpec& op : specs) {
            op.check = true;
            for (const OpSpec& other : specs) {
                if (&other != &op && changes_data(other) && overlaps(op, other)) {
                    op.check = false;
                }
            }
        }
        TaskScope scope(node->env().loop);
        for (const OpSpec& op : specs) {
            scope.spawn(run_op(user, node, op, report));
        }
        co_await scope.join();
        i += batch;
    }
    ++report->ops;
    if (!(co_await user->flush())) {
        ++report->failed_ops;
    }
}

// Reads the first range and a few clusters of a read-only reopen.
inline Task<void> read_reopened(Qcow2Node* node, Control* c) {
    std::vector<uint8_t> buf(std::min(node->size(), kFirstReadBytes));
    (void)co_await node->read(0, buf);
    const uint64_t cluster = node->header().cluster_size();
    for (int i = 0; i < 3; ++i) {
        Range r = pick_range(c, node->size(), cluster, kMaxIoBytes);
        buf.resize(r.bytes);
        (void)co_await node->read(r.offset, buf);
    }
}

}  // namespace detail

/// Opens `input` as a qcow2 image on an in-memory storage node (read-write, as an export
/// would), reads, writes, zeroes, discards, grows and flushes at offsets the input chooses,
/// closes, and reopens the result read-only. `loop` only runs coroutines: the storage never
/// submits I/O. Returns a finding only for a harness failure; read-after-write differences
/// are counted in `report` (a damaged image may legitimately lose writes).
inline std::string drive_image(EventLoop* loop, ConstBuf input, ImageReport* report = nullptr) {
    ImageReport scratch;
    report = report != nullptr ? report : &scratch;
    *report = ImageReport{};
    Control c(input);
    FuzzLogger log;
    Graph graph;  // outlives every node below
    const NodeEnv env{loop, &log, &graph};
    const uint64_t cluster = detail::claimed_cluster_size(input);

    // Storage: the input in a MemNode of fixed size, as is or with some zeroed room for
    // allocations inside the file (both make running out of room an error path to exercise),
    // or in a node that grows as the file driver does.
    std::shared_ptr<Node> storage;
    const uint64_t kind = c.below(4);
    if (kind < 2) {
        const uint64_t slack =
            kind == 0 ? 0
                      : std::min(std::max(4 * cluster, uint64_t{1} << 20), detail::kMaxSlackBytes);
        auto mem = std::make_shared<test::MemNode>(env, "fuzz.qcow2 (file)", input.size() + slack);
        std::copy(input.begin(), input.end(), mem->data.begin());
        storage = std::move(mem);
    } else {
        auto grow = std::make_shared<GrowableMemNode>(
            env, "fuzz.qcow2 (file)", std::vector<uint8_t>(input.begin(), input.end()),
            input.size() + detail::kMaxGrowthBytes);
        grow->yield_io = kind == 3;
        storage = std::move(grow);
    }

    qcow2::Options options;
    if (c.below(2) == 0) {
        options.l2_cache_bytes = 1;  // the minimum: 16 tables, so eviction happens
        options.refcount_cache_bytes = 1;
    }
    {
        Transaction tx(&graph);
        std::shared_ptr<Qcow2Node> node = Qcow2Node::create(env, kImageName, &tx, storage, options);
        if (Status st = tx.commit(); !st) {
            return "attaching the storage failed: " + st.error().message();
        }
        if (Status st = sync_wait(loop, node->load()); !st) {
            report->open_error = st.error().message();
            return {};
        }
        report->opened = true;
        if (!node->backing_file_name().empty()) {
            // The backing file itself is not part of the input: a patterned stand-in, as long
            // as the image or shorter.
            uint64_t bytes = std::min(node->size(), uint64_t{1} << 20);
            if (c.below(2) == 0) {
                bytes /= 2;
            }
            auto backing = std::make_shared<test::MemNode>(env, "backing", bytes);
            detail::fill_pattern(backing->data.data(), backing->data.size(), 0xbacc);
            backing->set_read_only(true);
            Transaction btx(&graph);
            btx.attach(node.get(), backing, ChildRole::kBacking, "backing");
            if (Status st = btx.commit(); !st) {
                return "attaching the backing node failed: " + st.error().message();
            }
        }
        BlockBackend user(loop, "fuzz");
        Transaction utx(&graph);
        user.attach(&utx, node, perm::kConsistentRead | perm::kWrite | perm::kResize,
                    perm::kConsistentRead | perm::kWriteUnchanged);
        if (Status st = utx.commit(); !st) {
            return "attaching the user failed: " + st.error().message();
        }
        sync_wait(loop, detail::run_image_ops(&user, node.get(), &c, report));
        (void)sync_wait(loop, node->close());
    }

    // What we wrote must at least open again (read-only: no repair) without harm.
    qcow2::Options ro;
    ro.read_only = true;
    Transaction tx(&graph);
    std::shared_ptr<Qcow2Node> again = Qcow2Node::create(env, kImageName, &tx, storage, ro);
    storage.reset();
    if (Status st = tx.commit(); !st) {
        return "attaching the storage for the reopen failed: " + st.error().message();
    }
    if (sync_wait(loop, again->load())) {
        report->reopened = true;
        sync_wait(loop, detail::read_reopened(again.get(), &c));
        (void)sync_wait(loop, again->close());
    }
    return {};
}

}  // namespace imgfs::fuzz
