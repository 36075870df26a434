// Crash sweep: the fault filter under the qcow2 node drops every write (and flush) after the
// Nth, as a crash would. N runs over every write of a workload that allocates L2 tables and
// refcount blocks, grows the refcount table and the L1 table, zeroes and discards. For every N,
// qemu-img check must find no corruption (leaks are allowed), and every byte flushed before the
// crash must read back after a read-write reopen.
#include <fcntl.h>
#include <gtest/gtest.h>

#include <random>

#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/file.h"
#include "drivers/qcow2/qcow2_node.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kGuestBytes = 8ULL << 20;

struct WorkOp {
    enum Kind { kWrite, kZero, kDiscard, kFlush, kGrow } kind;
    uint64_t offset = 0;
    uint64_t bytes = 0;
    uint8_t seed = 0;
};

// Three large writes first: 2.7 MiB of host clusters, more than one refcount block covers with
// 1-bit refcounts (2 MiB) and more than one refcount table cluster covers with 64-bit ones
// (2 MiB). Then scattered small ops that allocate many L2 tables (fewer with 64-bit refcounts,
// whose many refcount blocks already make for plenty of writes).
std::vector<WorkOp> workload(uint64_t seed, bool wide_refcounts) {
    std::mt19937_64 rng(seed);
    std::vector<WorkOp> ops;
    for (uint64_t i = 0; i < 3; ++i) {
        ops.push_back({WorkOp::kWrite, (i * 2 + 1) << 20, 900 * 1024 + 100,
                       static_cast<uint8_t>(i + 1)});
        ops.push_back({WorkOp::kFlush});
    }
    const bool bulk = wide_refcounts;
    int count = wide_refcounts ? 16 : 60;
    for (int i = 0; i < count; ++i) {
        if (i == count / 2) {
            ops.push_back({WorkOp::kGrow, kGuestBytes + (4ULL << 20), 0, 0});
        }
        if (i % 7 == 6) {
            ops.push_back({WorkOp::kFlush});
            continue;
        }
        WorkOp op{};
        int r = static_cast<int>(rng() % 10);
        op.kind = r < 7 ? WorkOp::kWrite : r < 9 ? WorkOp::kZero : WorkOp::kDiscard;
        op.bytes = 1 + rng() % (rng() % 3 == 0 && !bulk ? 96 * 1024 : 6000);
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

// Bytes whose durable content is known: `flushed` holds them, `known` marks which.
struct Durable {
    std::vector<uint8_t> model;    // what the guest wrote, in order
    std::vector<uint8_t> flushed;  // model at the last flush that really reached the file
    std::vector<uint8_t> dirty;    // 1: changed since that flush (content may be old or new)
};

class CrashSweep : public test::LoopTest, public ::testing::WithParamInterface<int> {
protected:
    // Runs the workload over image `path`, dropping writes after the `drop_after`th (or never
    // if negative). Returns the number of writes the file saw.
    uint64_t run_workload(const std::string& path, int64_t drop_after, Durable* d);
};

Task<void> run_ops(Qcow2Node* node, FaultNode* fault, size_t rule, std::vector<WorkOp> ops,
                   Durable* d) {
    std::vector<uint8_t> buf;
    for (const WorkOp& op : ops) {
        bool crashed = rule != SIZE_MAX && fault->fired(rule) > 0;
        Status st;
        switch (op.kind) {
            case WorkOp::kWrite:
                fill(op, &buf);
                st = co_await node->write(op.offset, buf);
                break;
            case WorkOp::kZero:
                st = co_await node->write_zeroes(op.offset, op.bytes, true);
                buf.assign(op.bytes, 0);
                break;
            case WorkOp::kDiscard:
                st = co_await node->discard(op.offset, op.bytes);
                buf.resize(op.bytes);
                if (st) {
                    st = co_await node->read(op.offset, buf);
                }
                break;
            case WorkOp::kFlush:
                st = co_await node->flush();
                // A flush counts only if nothing had been dropped when it completed.
                if (st && (rule == SIZE_MAX || fault->fired(rule) == 0)) {
                    d->flushed = d->model;
                    std::fill(d->dirty.begin(), d->dirty.end(), 0);
                }
                continue;
            case WorkOp::kGrow:
                st = co_await node->truncate(op.offset);
                d->model.resize(op.offset, 0);
                d->flushed.resize(op.offset, 0);
                d->dirty.resize(op.offset, 1);
                continue;
        }
        if (!st && !crashed && (rule == SIZE_MAX || fault->fired(rule) == 0)) {
            ADD_FAILURE() << "op failed before the crash: " << st.error().message();
        }
        std::copy(buf.begin(), buf.end(), d->model.begin() + static_cast<std::ptrdiff_t>(op.offset));
        std::fill_n(d->dirty.begin() + static_cast<std::ptrdiff_t>(op.offset), op.bytes, 1);
    }
}

uint64_t CrashSweep::run_workload(const std::string& path, int64_t drop_after, Durable* d) {
    d->model.assign(kGuestBytes, 0);
    d->flushed.assign(kGuestBytes, 0);
    d->dirty.assign(kGuestBytes, 0);
    auto file = FileNode::open(env(), "file", AT_FDCWD, path, {});
    EXPECT_TRUE(file.ok());
    if (!file.ok()) {
        return 0;
    }
    Transaction tx(&graph_);
    auto fault = FaultNode::open(env(), "fault", &tx, *file);
    auto node = Qcow2Node::create(env(), "img", &tx, fault, qcow2::Options{});
    EXPECT_TRUE(tx.commit().ok());
    EXPECT_TRUE(run(node->load()).ok());
    use_rw(node);
    size_t rule = SIZE_MAX;
    if (drop_after >= 0) {
        // Writes from the (N+1)th on are lost. Later flushes still pass, but nothing written
        // after the crash point reaches the file, and run_ops counts only flushes that
        // completed before it.
        FaultRule r{fault_op::kAllWrites, 0, false, static_cast<uint64_t>(drop_after) + 1};
        r.action = FaultAction::kDrop;
        rule = fault->add_rule(r);
    }
    run(run_ops(node.get(), fault.get(), rule, workload(99, GetParam() == 64), d));
    uint64_t writes = fault->count(fault_op::kWrite) + fault->count(fault_op::kWriteZeroes) +
                      fault->count(fault_op::kDiscard);
    // Crash: no close, no flush; the node and its caches just go.
    users_.clear();
    return writes;
}

Task<Status> verify_durable(Node* node, const Durable* d) {
    std::vector<uint8_t> got(node->size());
    CO_TRY(co_await node->read(0, got));
    for (size_t i = 0; i < d->flushed.size(); ++i) {
        if (d->dirty[i] == 0 && got[i] != d->flushed[i]) {
            co_return make_error(EIO, "flushed byte at {} reads {:#x}, expected {:#x}", i, got[i],
                                 d->flushed[i]);
        }
    }
    co_return Status{};
}

TEST_P(CrashSweep, EveryWriteIsACrashPoint) {
    REQUIRE_TOOL("qemu-img");
    const int refcount_bits = GetParam();
    // The fault filter decides what is durable; real fsyncs would only cost time.
    test::TempDir dir(test::memory_backed());
    const std::string pristine = dir.file("pristine.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=" +
               std::to_string(refcount_bits) + " '" + pristine + "' " + std::to_string(kGuestBytes));
    const std::string img = dir.file("img.qcow2");

    // Dry run: how many writes, and the workload is sound without a crash.
    test::must("cp '" + pristine + "' '" + img + "'");
    Durable d;
    uint64_t total = run_workload(img, -1, &d);
    ASSERT_GT(total, 100U);
    {
        // The workload must have exercised what it is for: several refcount blocks, and with
        // 64-bit refcounts a grown refcount table; and a grown L1 table.
        std::vector<uint8_t> img_bytes = test::read_file(img);
        uint64_t rt_offset = qcow2::load_be64(img_bytes.data() + 48);
        uint32_t rt_clusters = qcow2::load_be32(img_bytes.data() + 56);
        uint32_t l1_size = qcow2::load_be32(img_bytes.data() + 36);
        int blocks = 0;
        for (uint64_t i = 0; i < uint64_t{rt_clusters} * 512 / 8; ++i) {
            blocks += qcow2::load_be64(img_bytes.data() + rt_offset + i * 8) != 0 ? 1 : 0;
        }
        EXPECT_GT(blocks, 1);
        if (refcount_bits == 64) {
            EXPECT_GT(rt_clusters, 1U);
        }
        EXPECT_GT(l1_size, kGuestBytes / (512 * 64));
        std::printf("after the workload: %d refcount blocks, %u refcount table clusters, %u L1 "
                    "entries\n", blocks, rt_clusters, l1_size);
    }
    std::printf("workload: %llu writes\n", static_cast<unsigned long long>(total));
    std::fflush(stdout);
    // Every point by default; the sanitizer run (several times slower) may sample with a stride
    // (scripts/test.sh --sanitize sets IMGFS_CRASH_STRIDE).
    const char* stride_env = std::getenv("IMGFS_CRASH_STRIDE");
    const uint64_t stride = stride_env != nullptr ? std::max(1, std::atoi(stride_env)) : 1;
    int checked = 0;
    for (uint64_t n = 0; n <= total; n += stride) {
        test::must("cp '" + pristine + "' '" + img + "'");
        Durable dn;
        run_workload(img, static_cast<int64_t>(n), &dn);
        test::CheckResult c = test::qemu_check(img);
        ASSERT_EQ(c.corruptions, 0U) << "crash after write " << n << ":\n" << c.output;
        ASSERT_EQ(c.check_errors, 0U) << "crash after write " << n << ":\n" << c.output;
        ASSERT_TRUE(c.exit_code == 0 || c.exit_code == 3) << c.output;
        // Read-write reopen (repairs if needed), then every flushed byte must be there.
        auto file = FileNode::open(env(), "file", AT_FDCWD, img, {});
        ASSERT_TRUE(file.ok());
        Transaction tx(&graph_);
        auto node = Qcow2Node::create(env(), "img", &tx, *file, qcow2::Options{});
        ASSERT_TRUE(tx.commit().ok());
        Status st = run(node->load());
        ASSERT_TRUE(st.ok()) << "reopen after write " << n << ": " << st.error().message();
        dn.flushed.resize(node->size(), 0);
        dn.dirty.resize(node->size(), 1);
        st = run(verify_durable(node.get(), &dn));
        ASSERT_TRUE(st.ok()) << "after write " << n << ": " << st.error().message();
        ASSERT_TRUE(run(node->close()).ok());
        ++checked;
    }
    RecordProperty("crash_points", checked);
    std::printf("crash sweep (refcount_bits=%d): %d crash points, all consistent\n", refcount_bits,
                checked);
}

INSTANTIATE_TEST_SUITE_P(Refcounts, CrashSweep, ::testing::Values(1, 64),
                         [](const auto& param_info) {
                             return "refcount_bits_" + std::to_string(param_info.param);
                         });

}  // namespace
}  // namespace imgfs
