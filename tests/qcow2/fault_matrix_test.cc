// Fault injection at every metadata step: the fault filter under the qcow2 node fails the I/O of
// one step (header, L1, L2 write-back, L2 allocation, refcount block write-back and allocation,
// refcount table growth, COW read and write, data write, flush) with EIO or ENOSPC, once or
// always. The error must reach the caller with its errno; qemu-img check must find no corruption
// (leaks are allowed); with `once` the retry succeeds and every byte is as the model says; with
// `always` every byte flushed before the first failure reads back after a reopen.
#include <cstdio>
#include <fcntl.h>

#include <gtest/gtest.h>
#include <sys/stat.h>

#include "core/transaction.h"
#include "drivers/fault.h"
#include "drivers/file.h"
#include "drivers/qcow2/qcow2_node.h"
#include "qcow2/fault_stack.h"
#include "qcow2/image_test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kSize = 8 * kMiB;  // small: every case reads the whole image twice

struct FaultCase {
    const char* name;
    IoEvent event;  // kNone with kFlush ops: the flush itself
    uint32_t ops;
    int errnum;
    bool once;
};

void PrintTo(const FaultCase& c, std::ostream* os) {
    *os << c.name;
}

struct Op {
    enum Kind { kWrite, kZero, kDiscard, kFlush, kGrow } kind;
    uint64_t offset;
    uint64_t bytes;
    uint8_t fill;
};

// Touches every step: a partial write into a cluster shared with an internal snapshot (COW read
// from the image itself, L2 table copy), fresh L2 tables, 3 MiB of new clusters (new refcount
// blocks and, at 512-byte clusters with 64-bit refcounts, a bigger refcount table), flushes
// (L2 and refcount write-back), a grow (header, new L1 table), zeroes and discards.
std::vector<Op> workload() {
    return {
        {Op::kWrite, 512 * 1024 + 100, 4000, 0x21},
        {Op::kWrite, 2 * kMiB, 64 * 1024, 0x22},
        {Op::kWrite, 3 * kMiB + 7, 3 * kMiB, 0x23},
        {Op::kFlush, 0, 0, 0},
        {Op::kGrow, kSize + 4 * kMiB, 0, 0},
        {Op::kWrite, kSize + kMiB, 8192, 0x24},
        {Op::kZero, 3 * kMiB + 65536, 131072, 0},
        {Op::kDiscard, 2 * kMiB, 65536, 0},
        {Op::kWrite, 100, 300, 0x25},
        {Op::kFlush, 0, 0, 0},
    };
}

std::vector<FaultCase> cases() {
    struct Step {
        const char* name;
        IoEvent event;
        uint32_t ops;
    };
    const Step steps[] = {
        {"header", IoEvent::kHeader, fault_op::kAllWrites},
        {"l1", IoEvent::kL1, fault_op::kAllWrites},
        {"l2_writeback", IoEvent::kL2Write, fault_op::kAllWrites},
        {"l2_alloc", IoEvent::kL2Alloc, fault_op::kAllWrites},
        {"refblock_writeback", IoEvent::kRefblockWrite, fault_op::kAllWrites},
        {"refblock_alloc", IoEvent::kRefblockAlloc, fault_op::kAllWrites},
        {"reftable_grow", IoEvent::kRefTableGrow, fault_op::kAllWrites},
        {"cow_read", IoEvent::kCowRead, fault_op::kRead},
        {"cow_write", IoEvent::kCowWrite, fault_op::kAllWrites},
        {"data_write", IoEvent::kDataWrite, fault_op::kAllWrites},
        {"flush", IoEvent::kNone, fault_op::kFlush},
    };
    std::vector<FaultCase> out;
    static std::vector<std::string> names;  // keep the strings alive for the case names
    names.reserve(64);
    for (const Step& s : steps) {
        for (int err : {EIO, ENOSPC}) {
            for (bool once : {true, false}) {
                names.push_back(std::string(s.name) + (err == EIO ? "_eio" : "_enospc") +
                                (once ? "_once" : "_always"));
                out.push_back({names.back().c_str(), s.event, s.ops, err, once});
            }
        }
    }
    return out;
}

class FaultMatrix : public test::FaultStackTest, public ::testing::WithParamInterface<FaultCase> {
  protected:
    // One summary line for the category (ctest runs each case in its own process, so it
    // counts what this process ran).
    static inline int cases_run_ = 0;
    static inline int cases_failed_ = 0;
    void TearDown() override {
        ++cases_run_;
        cases_failed_ += HasFailure() ? 1 : 0;
        test::FaultStackTest::TearDown();
    }
    static void TearDownTestSuite() {
        std::printf("fault matrix: %d cases run, %d passed\n", cases_run_,
                    cases_run_ - cases_failed_);
    }
};

Task<Status> apply(Node* node, Op op) {
    switch (op.kind) {
        case Op::kWrite: {
            std::vector<uint8_t> d(op.bytes, op.fill);
            co_return co_await node->write(op.offset, d);
        }
        case Op::kZero:
            co_return co_await node->write_zeroes(op.offset, op.bytes, true);
        case Op::kDiscard:
            co_return co_await node->discard(op.offset, op.bytes);
        case Op::kFlush:
            co_return co_await node->flush();
        case Op::kGrow:
            co_return co_await node->truncate(op.offset);
    }
    co_return Status{};
}

TEST_P(FaultMatrix, ErrorReachesCallerAndImageStaysConsistent) {
    REQUIRE_TOOL("qemu-img");
    const FaultCase& c = GetParam();
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 '" + img + "' " +
               std::to_string(kSize));
    test::must("qemu-io -f qcow2 -c 'write -P 0x11 0 1M' '" + img + "' >/dev/null");
    test::must("qemu-img snapshot -c s1 '" + img + "'");

    std::vector<uint8_t> model = test::qemu_convert_raw(img);
    std::vector<uint8_t> durable = model;         // at the last flush before the first failure
    std::vector<uint8_t> dirty(model.size(), 0);  // changed since then (old or new allowed)
    Stack s = open(img);
    FaultRule rule{c.ops, c.errnum, c.once, 1};
    rule.event = c.event;
    size_t r = s.fault->add_rule(rule);
    bool failed_once = false;
    for (const Op& op : workload()) {
        Status st = run(apply(s.node.get(), op));
        if (!st) {
            if (!failed_once) {
                // The injected error reaches the caller as it is. (Later failures of an
                // `always` rule may be consequences, e.g. a write past a grow that failed.)
                EXPECT_EQ(st.error().errnum, c.errnum) << st.error().message();
            }
            failed_once = true;
            if (c.once) {
                st = run(apply(s.node.get(), op));  // the retry succeeds
                EXPECT_TRUE(st.ok()) << "retry: " << st.error().message();
            }
        }
        if (op.kind == Op::kGrow) {
            model.resize(op.offset, 0);
            durable.resize(op.offset, 0);
            dirty.resize(op.offset, 1);
            continue;
        }
        if (op.kind == Op::kFlush) {
            if (st && !failed_once) {
                durable = model;
                std::fill(dirty.begin(), dirty.end(), 0);
            }
            continue;
        }
        auto it = model.begin() + static_cast<std::ptrdiff_t>(op.offset);
        if (op.kind == Op::kWrite) {
            std::fill_n(it, op.bytes, op.fill);
        } else if (op.kind == Op::kZero) {
            std::fill_n(it, op.bytes, 0);
        }
        if (op.kind != Op::kDiscard) {
            std::fill_n(dirty.begin() + static_cast<std::ptrdiff_t>(op.offset), op.bytes, 1);
        } else {
            // Discarded content is unspecified: take what the image shows, if it still reads.
            std::vector<uint8_t> now(op.bytes);
            if (run(s.node->read(op.offset, now)).ok()) {
                std::copy(now.begin(), now.end(), it);
            }
            std::fill_n(dirty.begin() + static_cast<std::ptrdiff_t>(op.offset), op.bytes, 1);
        }
    }
    EXPECT_GT(s.fault->fired(r), 0U) << "the workload never reached this step";
    EXPECT_TRUE(failed_once) << "no request failed";
    Status closed = run(s.node->close());
    if (c.once) {
        EXPECT_TRUE(closed.ok()) << closed.error().message();
    }
    users_.clear();
    s = Stack{};

    test::CheckResult chk = test::qemu_check(img);
    EXPECT_EQ(chk.corruptions, 0U) << chk.output;
    EXPECT_EQ(chk.check_errors, 0U) << chk.output;

    Stack again = open(img);
    auto data = run(test::read_all(again.node.get()));
    ASSERT_TRUE(data.ok()) << data.error().message();
    if (c.once) {
        EXPECT_EQ(test::first_difference(*data, model), -1) << "after retries every byte is known";
    } else {
        for (size_t i = 0; i < std::min(data->size(), durable.size()); ++i) {
            if (dirty[i] == 0 && (*data)[i] != durable[i]) {
                ADD_FAILURE() << "flushed byte at " << i << " lost";
                break;
            }
        }
    }
    EXPECT_TRUE(run(again.node->close()).ok());
    users_.clear();
    again = Stack{};  // closes the file (and drops its image locks)
    // The internal snapshot is untouched.
    EXPECT_EQ((test::qemu_convert_raw(img, "-l snapshot.name=s1"))[600 * 1024], 0x11);
}

// Giving freed clusters' space back to the host file (a hole punch after the flush that made
// the tables durable) is advisory: a host file system that refuses it does not fail the
// flush, the image stays consistent, and the holes are punched at a later flush.
TEST_F(FaultMatrix, ARefusedHolePunchDoesNotFailTheFlush) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 '" + img + "' " + std::to_string(kSize));
    Stack s = open(img);
    std::vector<uint8_t> data(kMiB, 0x31);
    ASSERT_TRUE(run(s.node->write(0, data)).ok());
    ASSERT_TRUE(run(s.node->flush()).ok());
    ASSERT_TRUE(run(s.node->discard(0, kMiB)).ok());  // frees the clusters
    FaultRule rule{fault_op::kDiscard, ENOSPC, false, 1};
    const size_t r = s.fault->add_rule(rule);
    Status flushed = run(s.node->flush());
    EXPECT_GT(s.fault->fired(r), 0U) << "no hole was punched";
    EXPECT_TRUE(flushed.ok()) << flushed.error().message();
    s.fault->clear_rules();
    ASSERT_TRUE(run(s.node->flush()).ok());  // punches what the refused flush kept
    struct stat st {};
    ASSERT_EQ(::stat(img.c_str(), &st), 0);
    EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, kMiB / 2) << "the holes never came";
    ASSERT_TRUE(run(s.node->close()).ok());
    users_.clear();
    s = Stack{};
    test::CheckResult chk = test::qemu_check(img);
    EXPECT_EQ(chk.corruptions, 0U) << chk.output;
    EXPECT_EQ(chk.check_errors, 0U) << chk.output;
}

// A header write that switches to a bigger L1 table (a grow) reports an error but reached
// the disk: the image now uses the new table. A write that needs a new L1 entry meanwhile
// must not go into the old table, where nothing would find it after a reopen: it is refused
// until a switch succeeds, and every write acknowledged reads back after the reopen.
TEST_F(FaultMatrix, AHeaderSwitchThatLandedDespiteItsErrorLosesNoWrite) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    // 512-byte clusters: an L1 entry maps 32 KiB, so growing to 16 MiB needs a bigger L1.
    test::must("qemu-img create -q -f qcow2 -o cluster_size=512 '" + img + "' " +
               std::to_string(kSize));
    Stack s = open(img);
    const std::vector<uint8_t> first(4096, 0x41);
    const std::vector<uint8_t> second(4096, 0x42);
    ASSERT_TRUE(run(s.node->write(0, first)).ok());
    ASSERT_TRUE(run(s.node->flush()).ok());
    FaultRule rule{fault_op::kWrite, EIO, true, 1};
    rule.event = IoEvent::kHeader;
    rule.action = FaultAction::kLate;
    const size_t r = s.fault->add_rule(rule);
    Status grown = run(s.node->truncate(2 * kSize));
    ASSERT_GT(s.fault->fired(r), 0U);
    ASSERT_FALSE(grown.ok());
    // 4 MiB has no L2 table yet: this write needs a new L1 entry.
    Status unsettled = run(s.node->write(4 * kMiB, second));
    EXPECT_FALSE(unsettled.ok()) << "a new L1 entry went into a table the disk may not use";
    // More such writes, each into a range of its own L2 table: refused before a table is
    // allocated (each one leaked its new table before).
    for (uint64_t k = 1; k <= 20; ++k) {
        EXPECT_FALSE(run(s.node->write(4 * kMiB + k * 32768, second)).ok());
    }
    // A switch that succeeds settles it.
    ASSERT_TRUE(run(s.node->truncate(2 * kSize)).ok());
    Status settled = run(s.node->write(4 * kMiB, second));
    EXPECT_TRUE(settled.ok()) << settled.error().message();
    ASSERT_TRUE(run(s.node->close()).ok());
    users_.clear();
    s = Stack{};
    test::CheckResult chk = test::qemu_check(img);
    EXPECT_EQ(chk.corruptions, 0U) << chk.output;
    EXPECT_LT(chk.leaks, 10U) << chk.output;
    Stack again = open(img);
    std::vector<uint8_t> back(4096);
    ASSERT_TRUE(run(again.node->read(0, back)).ok());
    EXPECT_EQ(back, first);
    ASSERT_TRUE(run(again.node->read(4 * kMiB, back)).ok());
    EXPECT_EQ(back, unsettled.ok() || settled.ok() ? second : std::vector<uint8_t>(4096, 0));
    EXPECT_TRUE(run(again.node->close()).ok());
    users_.clear();
    again = Stack{};
}

// With the table caches over capacity, every allocating write first writes dirty tables
// back; when that keeps failing (a full disk), each write fails after its clusters were
// counted. They are given back: a disk that stays full does not leave one leak per write.
TEST_F(FaultMatrix, WritesFailingOnAFullCacheLeakNothing) {
    REQUIRE_TOOL("qemu-img");
    test::TempDir dir(test::memory_backed());
    const std::string img = dir.file("img.qcow2");
    test::must("qemu-img create -q -f qcow2 -o cluster_size=512 '" + img + "' " +
               std::to_string(kSize));
    qcow2::Options tiny;
    tiny.l2_cache_bytes = 16 * 512;  // the fewest tables the caches keep
    tiny.refcount_cache_bytes = 4 * 512;
    Stack s = open(img, tiny);
    FaultRule rule{fault_op::kAllWrites, ENOSPC, false, 1};
    rule.event = IoEvent::kL2Write;
    const size_t r = s.fault->add_rule(rule);
    int failed = 0;
    std::vector<uint8_t> data(512, 0x51);
    for (uint64_t i = 0; i < 64; ++i) {  // one cluster in each of 64 L2 tables' ranges
        failed += run(s.node->write(i * 32 * 1024, data)).ok() ? 0 : 1;
    }
    EXPECT_GT(s.fault->fired(r), 0U);
    EXPECT_GT(failed, 0);
    s.fault->clear_rules();
    ASSERT_TRUE(run(s.node->close()).ok());
    users_.clear();
    s = Stack{};
    test::CheckResult chk = test::qemu_check(img);
    EXPECT_EQ(chk.corruptions, 0U) << chk.output;
    EXPECT_EQ(chk.leaks, 0U) << failed << " writes failed\n" << chk.output;
}

// Writes on a full disk whose allocation fails before anything names the new clusters: a
// discard left the refcounts waiting for the L2 tables, so the next allocation first writes
// the tables back, and that fails. `table_exists`: the write's L2 table is already there, so
// its data run is written and linking it fails; otherwise the new L2 table's allocation
// fails. Either way the clusters are given back, not leaked one run or table per write.
class UnlinkedAllocation : public test::FaultStackTest {
  protected:
    // Returns how many writes failed; `chk` is qemu-img check's verdict afterwards.
    int run_writes(bool table_exists, test::CheckResult* chk) {
        test::TempDir dir(test::memory_backed());
        const std::string img = dir.file("img.qcow2");
        test::must("qemu-img create -q -f qcow2 -o cluster_size=512 '" + img + "' " +
                   std::to_string(kSize));
        Stack s = open(img);
        EXPECT_TRUE(run(s.node->write(0, std::vector<uint8_t>(64 * 1024, 0x60))).ok());
        if (table_exists) {
            EXPECT_TRUE(run(s.node->write(kMiB, std::vector<uint8_t>(512, 0x60))).ok());
        }
        EXPECT_TRUE(run(s.node->flush()).ok());
        int failed = 0;
        std::vector<uint8_t> data(2048, 0x61);
        for (uint64_t i = 0; i < 8; ++i) {
            s.fault->clear_rules();
            EXPECT_TRUE(run(s.node->discard(i * 4096, 4096)).ok());  // refcounts after L2
            FaultRule rule{fault_op::kAllWrites, ENOSPC, false, 1};
            rule.event = IoEvent::kL2Write;
            s.fault->add_rule(rule);
            Status w = run(s.node->write(kMiB + 4096 + i * 2048, data));
            failed += w.ok() ? 0 : 1;
            if (!w) {
                EXPECT_EQ(w.error().errnum, ENOSPC) << w.error().message();
            }
        }
        s.fault->clear_rules();
        EXPECT_TRUE(run(s.node->close()).ok());
        users_.clear();
        s = Stack{};
        *chk = test::qemu_check(img);
        return failed;
    }
    void expect_writes_fail_without_leaks(bool table_exists) {
        test::CheckResult chk;
        const int failed = run_writes(table_exists, &chk);
        EXPECT_EQ(failed, 8);
        EXPECT_EQ(chk.corruptions, 0U) << chk.output;
        EXPECT_EQ(chk.leaks, 0U) << failed << " writes failed\n" << chk.output;
    }
};

TEST_F(UnlinkedAllocation, AWriteWhoseLinkingFailsLeaksNoDataRun) {
    REQUIRE_TOOL("qemu-img");
    expect_writes_fail_without_leaks(true);
}

TEST_F(UnlinkedAllocation, AFailedL2AllocationLeaksNoTable) {
    REQUIRE_TOOL("qemu-img");
    expect_writes_fail_without_leaks(false);
}

INSTANTIATE_TEST_SUITE_P(Steps, FaultMatrix, ::testing::ValuesIn(cases()),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace imgfs
