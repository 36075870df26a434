// ExportFs driven by built FUSE requests (no mount): the basic operations, and the lifetime of a
// request's export and cache entries while other requests, drained sections and rescans change
// them (issue 12: refresh_blocks and raw Export*/Node* held across co_await, block status
// bypassing the backend).
#include <atomic>
#include <chrono>
#include <fcntl.h>
#include <thread>
#include <unistd.h>

#include <linux/falloc.h>

#include "core/drain.h"
#include "forwarding_store.h"
#include "fs_test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kSize = 8 << 20;

class ExportFsTest : public test::FsTest {
  protected:
    // The names of one READDIR reply of at most `size` bytes from `offset`, and the offset to
    // go on from (the last entry's).
    std::vector<std::string> readdir_names(uint64_t dir, uint64_t offset, uint32_t size,
                                           uint64_t* next) {
        fuse_read_in in{};
        in.offset = offset;
        in.size = size;
        test::Reply r = run(request(FUSE_READDIR, dir, bytes_of(in), {}));
        EXPECT_EQ(r.error, 0);
        std::vector<std::string> names;
        for (size_t at = 0; at + FUSE_NAME_OFFSET <= r.data.size();) {
            fuse_dirent d{};
            std::memcpy(&d, r.data.data() + at, FUSE_NAME_OFFSET);
            names.emplace_back(reinterpret_cast<const char*>(r.data.data() + at + FUSE_NAME_OFFSET),
                               d.namelen);
            *next = d.off;
            at += FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + d.namelen);
        }
        return names;
    }
};

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
    std::vector<uint8_t> v(n);
    for (size_t i = 0; i < n; ++i) {
        v[i] = static_cast<uint8_t>(seed + i * 7);
    }
    return v;
}

TEST_F(ExportFsTest, ReadsWritesAndAttributesThroughBuiltRequests) {
    make_qcow2("vm.qcow2", kSize);
    start();
    EXPECT_NE(ino("vm.raw"), 0U);
    EXPECT_NE(ino(".control/vm/info"), 0U);
    EXPECT_EQ(ino("nope.raw"), 0U);
    std::vector<uint8_t> data = pattern(100000, 3);
    write_raw("vm", 12345, data);
    std::vector<uint8_t> all = read_raw("vm");
    ASSERT_EQ(all.size(), kSize);
    EXPECT_TRUE(std::equal(data.begin(), data.end(), all.begin() + 12345));
    test::Reply attr = run(getattr_task(ino("vm.raw")));
    ASSERT_EQ(attr.error, 0);
    EXPECT_EQ(attr.as<fuse_attr_out>().attr.size, kSize);
    EXPECT_GT(attr.as<fuse_attr_out>().attr.blocks, 0U);
    test::Reply st = run(request(FUSE_STATFS, ExportFs::kRootIno, {}, {}));
    ASSERT_EQ(st.error, 0);
    EXPECT_GT(st.as<fuse_statfs_out>().st.blocks, 0U);
    EXPECT_NE(read_text(".control/vm/info").find("\"name\":\"vm\""), std::string::npos);
}

// A disk is a whole number of sectors. NAME.raw grown to 16 MiB + 1 byte made a qcow2 image
// of that size, which QEMU rounds down and of which no snapshot could be made (a new qcow2
// file refuses such a size); the grow is refused, and whole sectors still grow it.
TEST_F(ExportFsTest, NameRawGrowsOnlyByWholeSectors) {
    make_qcow2("vm.qcow2", kSize);
    start();
    const uint64_t raw = ino("vm.raw");
    EXPECT_EQ(run(setattr_size_task(raw, kSize + 1)).error, EINVAL);
    const uint64_t fh = open(raw, O_RDWR);
    EXPECT_EQ(run(fallocate_task(raw, fh, 0, kSize, 1000)).error, EINVAL);
    EXPECT_EQ(run(fallocate_task(raw, fh, FALLOC_FL_ZERO_RANGE, kSize - 512, 1000)).error, EINVAL);
    release(raw, fh);
    EXPECT_EQ(run(getattr_task(raw)).as<fuse_attr_out>().attr.size, kSize);
    EXPECT_EQ(run(setattr_size_task(raw, kSize + 512)).error, 0);
    EXPECT_EQ(run(getattr_task(raw)).as<fuse_attr_out>().attr.size, kSize + 512);
    EXPECT_EQ(control(".control/vm/snapshot", "s1"), 0) << images_->find("vm")->last_error;
}

// An open with O_TRUNC reaches the daemon as a truncation to 0 without a file handle (the
// daemon does not take FUSE_ATOMIC_O_TRUNC, with which the kernel took NAME.raw for emptied
// until its next getattr). It is ignored; an ftruncate (with its handle) is refused.
TEST_F(ExportFsTest, AnOpenWithOTruncLeavesNameRawAsItWas) {
    make_qcow2("vm.qcow2", kSize);
    start();
    const uint64_t raw = ino("vm.raw");
    fuse_setattr_in open_trunc{};
    open_trunc.valid = FATTR_SIZE | FATTR_LOCKOWNER;
    test::Reply r = run(request(FUSE_SETATTR, raw, bytes_of(open_trunc), {}));
    ASSERT_EQ(r.error, 0);
    EXPECT_EQ(r.as<fuse_attr_out>().attr.size, kSize);  // the kernel takes its size from this
    const uint64_t fh = open(raw, O_RDWR);
    fuse_setattr_in ftrunc = open_trunc;
    ftrunc.valid |= FATTR_FH;
    ftrunc.fh = fh;
    EXPECT_EQ(run(request(FUSE_SETATTR, raw, bytes_of(ftrunc), {})).error, EPERM);
    release(raw, fh);
    EXPECT_EQ(run(getattr_task(raw)).as<fuse_attr_out>().attr.size, kSize);
}

// A store that cannot tell its room (a dead cluster, a failing disk): STATFS says so with the
// store's errno instead of reporting a file system of zero blocks, and logs it once while the
// failure lasts.
class SpacelessStore final : public test::ForwardingStore {
  public:
    SpacelessStore(std::unique_ptr<Store> inner, const bool* fail)
        : ForwardingStore(std::move(inner)), fail_(fail) {}
    Result<StoreSpace> space() override {
        if (*fail_) {
            return make_error(ETIMEDOUT, "asking the cluster for its room: injected");
        }
        return inner()->space();
    }

  private:
    const bool* fail_;
};

TEST_F(ExportFsTest, StatfsReportsAStoreThatCannotTellItsRoom) {
    bool fail = true;
    wrap_store_ = [&fail](std::unique_ptr<Store> inner) -> std::unique_ptr<Store> {
        return std::make_unique<SpacelessStore>(std::move(inner), &fail);
    };
    make_qcow2("vm.qcow2", kSize);
    start();
    for (int i = 0; i < 3; ++i) {
        test::Reply st = run(request(FUSE_STATFS, ExportFs::kRootIno, {}, {}));
        EXPECT_EQ(st.error, ETIMEDOUT);
    }
    size_t logged = 0;
    for (const std::string& line : log_.lines()) {
        logged += line.find("cannot tell the room") != std::string::npos ? 1 : 0;
    }
    EXPECT_EQ(logged, 1U);
    fail = false;
    test::Reply st = run(request(FUSE_STATFS, ExportFs::kRootIno, {}, {}));
    ASSERT_EQ(st.error, 0);
    EXPECT_GT(st.as<fuse_statfs_out>().st.blocks, 0U);
}

// A store slow to tell its room (a cluster near its deadline, a hung NFS directory). Every
// STATFS waited for its own query, holding a request buffer: 41 `df` calls at once took all
// of them and stopped every image's I/O. One query runs at a time; the others are answered
// with the last figure at once.
class SlowSpaceStore final : public test::ForwardingStore {
  public:
    SlowSpaceStore(std::unique_ptr<Store> inner, std::atomic<int>* asked)
        : ForwardingStore(std::move(inner)), asked_(asked) {}
    Result<StoreSpace> space() override {
        if (asked_->fetch_add(1) > 0) {
            std::this_thread::sleep_for(std::chrono::milliseconds(300));
        }
        return inner()->space();
    }

  private:
    std::atomic<int>* asked_;
};

TEST_F(ExportFsTest, ACrowdOfStatfsCallsAsksTheStoreOnce) {
    std::atomic<int> asked{0};
    wrap_store_ = [&asked](std::unique_ptr<Store> inner) -> std::unique_ptr<Store> {
        return std::make_unique<SlowSpaceStore>(std::move(inner), &asked);
    };
    fs_options_.statfs_refresh = std::chrono::milliseconds(0);  // every call would ask
    asked = 1;                                                  // slow from the first query on
    make_qcow2("vm.qcow2", kSize);
    start();
    // The first crowd finds no figure yet, and later ones an old figure: each asks once.
    for (int round = 1; round <= 2; ++round) {
        constexpr int kCalls = 40;
        std::vector<test::Reply> replies(kCalls);
        const auto start_time = std::chrono::steady_clock::now();
        {
            TaskScope scope(loop_.get());
            for (test::Reply& r : replies) {
                scope.spawn(store(request(FUSE_STATFS, ExportFs::kRootIno, {}, {}), &r));
            }
            run(join(&scope));
        }
        const auto took = std::chrono::steady_clock::now() - start_time;
        EXPECT_EQ(asked.load(), 1 + round) << "the store was asked once per call";
        for (const test::Reply& r : replies) {
            ASSERT_EQ(r.error, 0);
            EXPECT_GT(r.as<fuse_statfs_out>().st.blocks, 0U);
        }
        EXPECT_LT(took, std::chrono::seconds(2)) << "the calls waited for each other's queries";
    }
}

// GETATTR counts the allocation across awaits while FALLOCATE (PUNCH_HOLE) invalidates the
// cache entry it counts into (`stat NAME.raw` while `fstrim` runs on the loop device). The count
// is held in the file layer after its first run, the punch of that run completes meanwhile: the
// count never writes into a freed entry (a heap use-after-free under ASan before), and as it
// raced the punch it is not kept as the current figure.
TEST_F(ExportFsTest, GetattrRacingPunchHoleKeepsTheCacheSound) {
    make_raw("vm.img", kSize);  // raw: its block status asks the file layer, where reads wait
    ImageSetOptions o;
    gate_files(&o);
    start(o);
    const uint64_t piece = kSize / 8;
    for (uint64_t i = 0; i < 8; i += 2) {  // data, hole, data, hole...: several runs to count
        write_raw("vm", i * piece, pattern(piece, static_cast<uint8_t>(i)));
    }
    const uint64_t raw = ino("vm.raw");
    const uint64_t fh = open(raw, O_RDWR);
    for (uint64_t i = 0; i < 8; i += 2) {
        test::Reply attr;
        test::Reply punch;
        TaskScope scope(loop_.get());
        hold_gate_reads(1);
        scope.spawn(store(getattr_task(raw), &attr));  // counts the first run, then waits
        idle(5);
        scope.spawn(store(
            fallocate_task(raw, fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, i * piece, piece),
            &punch));
        idle(5);
        EXPECT_EQ(punch.error, 0);  // done while the count waits
        release_gates();
        run(join(&scope));
        EXPECT_EQ(attr.error, 0);
        test::Reply after = run(getattr_task(raw));
        ASSERT_EQ(after.error, 0);
        EXPECT_EQ(after.as<fuse_attr_out>().attr.blocks * 512, (8 - i - 2) / 2 * piece)
            << "a count from before the punch at " << i * piece << " was kept";
    }
    release(raw, fh);
}

// A `stat` storm on one image (many GETATTRs while its allocation count is stale) runs one
// count: the others answer at once with the last figure instead of each walking the whole
// map and holding a request buffer meanwhile.
TEST_F(ExportFsTest, OneAllocationCountAtATimePerImage) {
    make_raw("vm.img", kSize);
    ImageSetOptions o;
    gate_files(&o);
    start(o);
    write_raw("vm", 0, pattern(kSize / 8, 1));
    write_raw("vm", kSize / 2, pattern(kSize / 8, 2));
    const uint64_t raw = ino("vm.raw");
    test::Reply first;
    first.error = -1;  // replaced by the reply
    std::vector<test::Reply> others(8);
    for (test::Reply& r : others) {
        r.error = -1;
    }
    TaskScope scope(loop_.get());
    hold_gate_reads(1);
    scope.spawn(store(getattr_task(raw), &first));  // counts the first run, then waits
    idle(5);
    for (test::Reply& r : others) {
        scope.spawn(store(getattr_task(raw), &r));
    }
    idle(5);
    for (const test::Reply& r : others) {
        EXPECT_EQ(r.error, 0) << "a getattr waited for (or started) a second count";
    }
    EXPECT_EQ(first.error, -1) << "the count did not wait at the gate";
    release_gates();
    run(join(&scope));
    EXPECT_EQ(first.error, 0);
    test::Reply after = run(getattr_task(raw));
    ASSERT_EQ(after.error, 0);
    EXPECT_EQ(after.as<fuse_attr_out>().attr.blocks * 512, kSize / 4);
}

// A stale allocation count is recounted a step per GETATTR, which answers with the last figure
// meanwhile: a `stat` of a large, fragmented image never waits for a walk of all of it.
TEST_F(ExportFsTest, AStaleAllocationCountIsRecountedInSteps) {
    make_raw("vm.img", kSize);
    {
        // Data in every other 4 KiB: 2048 runs of data and holes to count.
        UniqueFd fd(::openat(dir_fd_.get(), "vm.img", O_RDWR | O_CLOEXEC));
        ASSERT_TRUE(fd.valid());
        std::vector<uint8_t> page(4096, 1);
        for (uint64_t off = 0; off < kSize; off += 8192) {
            ASSERT_EQ(::pwrite(fd.get(), page.data(), page.size(), static_cast<off_t>(off)), 4096);
        }
    }
    fs_options_.blocks_refresh = std::chrono::milliseconds(0);  // every figure is stale at once
    start();
    const uint64_t raw = ino("vm.raw");
    auto blocks = [&] {
        test::Reply r = run(getattr_task(raw));
        EXPECT_EQ(r.error, 0);
        return r.as<fuse_attr_out>().attr.blocks * 512;
    };
    EXPECT_EQ(blocks(), kSize / 2);                        // no figure yet: counted to the end
    write_raw("vm", 4096, std::vector<uint8_t>(4096, 2));  // fills the first hole
    int steps = 1;
    while (blocks() == kSize / 2) {
        ++steps;
        ASSERT_LT(steps, 100) << "the recount never finished";
    }
    EXPECT_EQ(blocks(), kSize / 2 + 4096);
    EXPECT_GE(steps, 3) << "a GETATTR walked the whole image";
}

// A listing that takes several READDIRs (a long root, or a small getdents buffer) while a
// rescan drops an image listed already: the rest of the listing loses nothing.
TEST_F(ExportFsTest, AListingGoesOnWhereItWasAfterARescan) {
    for (const char* name : {"a.qcow2", "b.qcow2", "c.qcow2", "d.qcow2", "e.qcow2"}) {
        make_qcow2(name, 1 << 20);
    }
    start();
    uint64_t next = 0;
    // "." and ".." and a.raw: three entries of 32 bytes each (names up to 8 bytes).
    std::vector<std::string> first = readdir_names(ExportFs::kRootIno, 0, 96, &next);
    ASSERT_EQ(first, (std::vector<std::string>{".", "..", "a.raw"}));
    ASSERT_EQ(::unlink((dir_.path() / "a.qcow2").c_str()), 0);
    ASSERT_EQ(control(".control/rescan", "\n"), 0);
    std::vector<std::string> rest = readdir_names(ExportFs::kRootIno, next, 4096, &next);
    EXPECT_EQ(rest, (std::vector<std::string>{"b.raw", "c.raw", "d.raw", "e.raw", ".control"}));
}

// Images come and go over a mount's life (export ids are never reused): the allocation figures
// of those that are gone are dropped, so the map does not grow with every image ever seen.
TEST_F(ExportFsTest, AllocationFiguresOfGoneImagesAreDropped) {
    make_qcow2("keep.qcow2", 1 << 20);
    start();
    ASSERT_EQ(run(getattr_task(ino("keep.raw"))).error, 0);
    for (int i = 0; i < 100; ++i) {
        const std::string name = "tmp" + std::to_string(i);
        make_qcow2(name + ".qcow2", 1 << 20);
        ASSERT_EQ(control(".control/rescan", "\n"), 0);
        ASSERT_EQ(run(getattr_task(ino(name + ".raw"))).error, 0);
        ASSERT_EQ(::unlink((dir_.path() / (name + ".qcow2")).c_str()), 0);
        ASSERT_EQ(control(".control/rescan", "\n"), 0);
    }
    // 101 figures without the pruning; with it, at most twice the live exports (two at a
    // time here) plus slack.
    EXPECT_LE(fs_->allocation_figures(), 24u);
    EXPECT_EQ(run(getattr_task(ino("keep.raw"))).error, 0);
}

// lseek and the allocation count of getattr ask the chain for block status; they go through the
// backend, so a drained section (a snapshot's switch) holds them like reads and writes.
TEST_F(ExportFsTest, BlockStatusWaitsWhileTheExportIsDrained) {
    make_qcow2("vm.qcow2", kSize);
    start();
    write_raw("vm", 0, pattern(65536, 1));
    const uint64_t raw = ino("vm.raw");
    auto e = images_->find("vm");
    std::vector<std::shared_ptr<Node>> nodes{e->chain.top()};
    DrainGuard drained = run(drain(nodes));
    bool seek_done = false;
    bool attr_done = false;
    auto seek = [](ExportFsTest* t, uint64_t i, bool* done) -> Task<void> {
        test::Reply r = co_await t->lseek_task(i, 0, 0, SEEK_HOLE);
        EXPECT_EQ(r.error, 0);
        EXPECT_EQ(r.as<fuse_lseek_out>().offset, 65536U);
        *done = true;
    };
    auto attr = [](ExportFsTest* t, uint64_t i, bool* done) -> Task<void> {
        test::Reply r = co_await t->getattr_task(i);
        EXPECT_EQ(r.error, 0);
        *done = true;
    };
    TaskScope scope(loop_.get());
    scope.spawn(seek(this, raw, &seek_done));
    scope.spawn(attr(this, raw, &attr_done));
    idle(20);
    EXPECT_FALSE(seek_done) << "lseek asked the chain inside a drained section";
    EXPECT_FALSE(attr_done) << "getattr counted blocks inside a drained section";
    drained.end();
    run(join(&scope));
    EXPECT_TRUE(seek_done);
    EXPECT_TRUE(attr_done);
}

// Requests in flight (reads held in the file layer) while a rescan drops their export: the
// export and its backend stay alive until they reply, and the removal waits for them (it used
// to close the layers and free the export under them).
TEST_F(ExportFsTest, RequestsInFlightKeepARemovedExportAlive) {
    make_raw("vm.img", kSize);  // raw: its block status asks the file layer, where reads wait
    make_qcow2("other.qcow2", kSize);
    ImageSetOptions o;
    gate_files(&o);
    start(o);
    write_raw("vm", 0, pattern(1 << 20, 9));
    const uint64_t raw = ino("vm.raw");
    const uint64_t rescan = ino(".control/rescan");
    hold_gate_reads();
    std::vector<test::Reply> replies(4);
    TaskScope scope(loop_.get());
    scope.spawn(store(getattr_task(raw), &replies[0]));
    scope.spawn(store(lseek_task(raw, 0, 0, SEEK_HOLE), &replies[1]));
    scope.spawn(store(fallocate_task(raw, 0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096),
                      &replies[2]));
    scope.spawn(store(setattr_size_task(raw, kSize * 2), &replies[3]));
    idle(10);
    ASSERT_EQ(::unlinkat(dir_fd_.get(), "vm.img", 0), 0);
    int rescan_result = -1;
    scope.spawn(store_int(control_task(rescan, "\n"), &rescan_result));
    idle(50);
    EXPECT_EQ(rescan_result, -1) << "the rescan removed the export under requests in flight";
    EXPECT_EQ(replies[2].error, 0);  // writes were not held: the punch and the grow are done
    EXPECT_EQ(replies[3].error, 0);
    EXPECT_NE(images_->find("vm"), nullptr);
    release_gates();
    run(join(&scope));
    EXPECT_EQ(rescan_result, 0);
    EXPECT_EQ(images_->find("vm"), nullptr);
    // Answered, on an export that is gone by now (getattr finds the inode gone).
    for (const test::Reply& r : replies) {
        EXPECT_TRUE(r.error == 0 || r.error == ENODEV || r.error == ESTALE) << r.error;
    }
    // ESTALE: the kernel looks the name up again, and finds it gone (or re-exported).
    EXPECT_EQ(run(getattr_task(raw)).error, ESTALE);
    EXPECT_EQ(read_raw("other").size(), kSize);  // the other export serves on
}

// While a rescan drains an export it removes, the export is still listed. An open then got
// it, and once its chain was detached the file read as an empty disk (0 bytes, no error) and
// an fsync on it reported success. It is gone from the start of the removal now.
TEST_F(ExportFsTest, AnImageBeingRemovedCannotBeOpened) {
    make_raw("vm.img", kSize);
    ImageSetOptions o;
    gate_files(&o);
    start(o);
    write_raw("vm", 0, pattern(1 << 20, 5));
    const uint64_t raw = ino("vm.raw");
    const uint64_t rescan = ino(".control/rescan");
    hold_gate_reads();
    test::Reply held;
    TaskScope scope(loop_.get());
    scope.spawn(store(lseek_task(raw, 0, 0, SEEK_HOLE), &held));  // keeps the drain waiting
    idle(10);
    ASSERT_EQ(::unlinkat(dir_fd_.get(), "vm.img", 0), 0);
    int rescan_result = -1;
    scope.spawn(store_int(control_task(rescan, "\n"), &rescan_result));
    idle(50);
    ASSERT_EQ(rescan_result, -1) << "the removal did not wait for the request in flight";
    fuse_open_in open_in{};
    open_in.flags = O_RDWR;
    EXPECT_EQ(run(request(FUSE_OPEN, raw, bytes_of(open_in), {})).error, ESTALE);
    fuse_fsync_in fsync_in{};
    EXPECT_EQ(run(request(FUSE_FSYNC, raw, bytes_of(fsync_in), {})).error, ENODEV);
    release_gates();
    run(join(&scope));
    EXPECT_EQ(rescan_result, 0);
    EXPECT_EQ(images_->find("vm"), nullptr);
}

}  // namespace
// A shell's printf writes a line longer than st_blksize (4096) in pieces, the first exactly
// 4096 bytes. Each piece parsed on its own was a command: "s1 a" plus padding snapshotted a,
// and the rest, " b", snapshotted every image as "b". Both pieces are refused now, and
// nothing is made.
TEST_F(ExportFsTest, ALongLineInPiecesIsRefusedWhole) {
    make_qcow2("a.qcow2", kSize);
    make_qcow2("b.qcow2", kSize);
    start();
    std::string first = "s1 a" + std::string(4092, ' ');
    ASSERT_EQ(first.size(), 4096U);
    std::vector<int> errors = control_writes(".control/snapshot", {first, " b\n"});
    EXPECT_EQ(errors, (std::vector<int>{EINVAL, EINVAL}));
    EXPECT_EQ(chain("a").size(), 1U);
    EXPECT_EQ(chain("b").size(), 1U);
    // A handle whose writes were short lines takes them all, one command each.
    errors = control_writes(".control/a/snapshot", {"s2\n", "s3\n"});
    EXPECT_EQ(errors, (std::vector<int>{0, 0}));
    EXPECT_EQ(chain("a").size(), 3U);
    // Once the refused line has ended, the same handle takes commands again (it refused
    // every later write on it).
    errors = control_writes(".control/a/snapshot", {std::string(600, ' '), "\n", "s4\n"});
    EXPECT_EQ(errors, (std::vector<int>{EINVAL, EINVAL, 0}));
    EXPECT_EQ(chain("a").size(), 4U);
    errors = control_writes(".control/a/snapshot", {std::string(4095, ' ') + "\n", "s5\n"});
    EXPECT_EQ(errors, (std::vector<int>{EINVAL, 0}));
    EXPECT_EQ(chain("a").size(), 5U);
    // 4095 bytes with the newline is not refused for its length (whatever the command says).
    (void)control(".control/b/snapshot", "s4" + std::string(4092, ' ') + "\n");
    EXPECT_EQ(read_text(".control/b/info").find("bytes or more"), std::string::npos);
}

// A group snapshot leaves its outcome as each image's last error: the reason when it was
// refused (before, a refusal before the jobs ran left the previous command's reason, which the
// CLI then printed), none when it succeeded (before, a failed group's reason stayed).
TEST_F(ExportFsTest, AGroupSnapshotLeavesItsOwnOutcomeAsTheLastError) {
    make_qcow2("a.qcow2", kSize);
    make_qcow2("b.qcow2", kSize);
    start();
    EXPECT_EQ(control(".control/a/snapshot", "x/y"), EINVAL);
    EXPECT_EQ(control(".control/snapshot", "s1 a a"), EINVAL);
    EXPECT_NE(read_text(".control/a/info").find("named twice"), std::string::npos);
    EXPECT_EQ(control(".control/snapshot", "s1 a nosuch"), EINVAL);
    EXPECT_NE(read_text(".control/a/info").find("no image 'nosuch'"), std::string::npos);
    // An image named after the bad name keeps the reason too.
    EXPECT_EQ(control(".control/snapshot", "s1 nosuch b"), EINVAL);
    EXPECT_NE(read_text(".control/b/info").find("no image 'nosuch'"), std::string::npos);
    EXPECT_EQ(control(".control/snapshot", "s2 a b"), 0);
    EXPECT_EQ(read_text(".control/a/info").find("group snapshot"), std::string::npos);
    EXPECT_NE(read_text(".control/a/info").find("\"last_error\":\"\""), std::string::npos)
        << read_text(".control/a/info");
}

// An interactive bash's stdout buffer is 1024 bytes (a terminal's block size), kept when echo
// is redirected: a longer line arrives as 1024 bytes, then the rest. Before, only pieces of
// 4096 were caught, and "s1 a..." snapshotted a, then " b" snapshotted every image as "b".
TEST_F(ExportFsTest, ALineInPiecesOfATerminalsBufferIsRefusedWhole) {
    make_qcow2("a.qcow2", kSize);
    make_qcow2("b.qcow2", kSize);
    start();
    std::string first = "s1 a" + std::string(1020, ' ');
    std::vector<int> errors = control_writes(".control/snapshot", {first, " b\n"});
    EXPECT_EQ(errors, (std::vector<int>{EINVAL, EINVAL}));
    EXPECT_EQ(chain("a").size(), 1U);
    EXPECT_EQ(chain("b").size(), 1U);
    // The same command in one write, with its newline, runs.
    EXPECT_EQ(control(".control/snapshot", first + " b\n"), 0);
    EXPECT_EQ(chain("a").size(), 2U);
    EXPECT_EQ(chain("b").size(), 2U);
}

// A snapshot of an image with a long name is refused with the reason before anything is
// made, not with ENAMETOOLONG half way; and what `info` echoes stays valid UTF-8.
TEST_F(ExportFsTest, ASnapshotNameTooLongForTheDirectoryIsBadInput) {
    const std::string name(240, 'x');  // 249 bytes with "@s1.qcow2", 265 with the helpers
    make_qcow2(name + ".qcow2", kSize);
    start();
    EXPECT_EQ(control(".control/" + name + "/snapshot", "s1"), EINVAL);
    EXPECT_NE(read_text(".control/" + name + "/info").find("is too long"), std::string::npos);
    EXPECT_EQ(chain(name).size(), 1U);
    EXPECT_EQ(control(".control/" + name + "/snapshot", "s\xff"), EINVAL);
    const std::string info = read_text(".control/" + name + "/info");
    EXPECT_EQ(info.find('\xff'), std::string::npos) << info;
    EXPECT_NE(info.find("\\ufffd"), std::string::npos) << info;
}

// On a read-only mount every command but a rescan is refused with EROFS, whatever it says:
// a malformed one too, before it is parsed.
TEST_F(ExportFsTest, AReadOnlyMountRefusesEveryCommandButARescanWithErofs) {
    make_qcow2("vm.qcow2", kSize);
    ImageSetOptions options;
    options.read_only = true;
    start(options);
    EXPECT_EQ(control(".control/vm/snapshot", "bad name"), EROFS);
    EXPECT_EQ(control(".control/vm/job", "cancel"), EROFS);
    EXPECT_EQ(control(".control/vm/commit", "base=\x01"), EROFS);
    EXPECT_EQ(control(".control/snapshot", "s1"), EROFS);
    EXPECT_NE(read_text(".control/vm/info").find("mounted read-only"), std::string::npos);
    EXPECT_EQ(control(".control/rescan", "\n"), 0);
    EXPECT_EQ(chain("vm").size(), 1U);
}

}  // namespace imgfs
