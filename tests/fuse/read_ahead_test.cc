// ReadAhead through ExportFs (built requests, no mount): an in-order reader is served from
// windows read ahead, and nothing read ahead is ever served once a write, a drained section or
// a failed image could have changed what the disk holds there.
#include <fcntl.h>

#include <linux/falloc.h>

#include "forwarding_store.h"
#include "fs_test_util.h"

namespace imgfs {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 16 * kMiB;

class ReadAheadTest : public test::FsTest {
  protected:
    // vm.qcow2 of kSize holding pattern(seed 1) everywhere, served, and vm.raw open.
    // With `gated`, every file is behind a GateNode (hold_gate_reads and the like work).
    void start_with_data(bool gated = false) {
        make_qcow2("vm.qcow2", kSize);
        ImageSetOptions options;
        if (gated) {
            gate_files(&options);
        }
        start(options);
        write_raw("vm", 0, pattern(kSize, 1));
        raw_ = ino("vm.raw");
        fh_ = open(raw_, O_RDWR);
    }
    static std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
        std::vector<uint8_t> v(n);
        for (size_t i = 0; i < n; ++i) {
            v[i] = static_cast<uint8_t>(seed + i * 7 + i / 4096);
        }
        return v;
    }
    std::vector<uint8_t> expected(uint64_t offset, uint64_t n) const {
        return {model_.begin() + static_cast<ptrdiff_t>(offset),
                model_.begin() + static_cast<ptrdiff_t>(offset + n)};
    }
    // One read of `n` bytes at `offset`, checked against the model.
    void read_checked(uint64_t offset, uint32_t n) {
        test::Reply r = run(read_task(raw_, fh_, offset, n));
        ASSERT_EQ(r.error, 0);
        ASSERT_EQ(r.data.size(), n);
        EXPECT_TRUE(r.data == expected(offset, n)) << "read of " << n << " at " << offset;
    }
    void write(uint64_t offset, std::vector<uint8_t> data) {
        fuse_write_in w{};
        w.fh = fh_;
        w.offset = offset;
        w.size = static_cast<uint32_t>(data.size());
        std::copy(data.begin(), data.end(), model_.begin() + static_cast<ptrdiff_t>(offset));
        test::Reply r = run(request(FUSE_WRITE, raw_, bytes_of(w), std::move(data)));
        ASSERT_EQ(r.error, 0);
    }
    // Serves vm behind gates and reads its first 3 MiB in order: the third read starts the
    // windows at 3 and 4 MiB, which wait at the gate (the client's own read passes it).
    void start_with_windows_held() {
        start_with_data(/*gated=*/true);
        read_checked(0, kMiB);
        read_checked(kMiB, kMiB);
        hold_gate_reads(1);
        read_checked(2 * kMiB, kMiB);
    }
    // Reads the first `count` MiB in order, letting each window fill.
    void read_in_order(uint64_t count) {
        for (uint64_t off = 0; off < count * kMiB; off += kMiB) {
            read_checked(off, kMiB);
            idle(5);
        }
    }
    const ReadAhead::Stats& stats() const { return fs_->read_ahead().stats(); }

    std::vector<uint8_t> model_ = pattern(kSize, 1);
    uint64_t raw_ = 0;
    uint64_t fh_ = 0;
};

TEST_F(ReadAheadTest, AnInOrderReaderIsServedFromWindows) {
    start_with_data();
    for (uint64_t off = 0; off < kSize; off += kMiB) {
        read_checked(off, kMiB);
        idle(5);  // the client turning around: the window fills meanwhile
    }
    // The third read (the second in order) started the two windows after it and each later
    // one the window two ahead, up to the end of the disk; each read after the third used one.
    EXPECT_EQ(stats().started, kSize / kMiB - 3);
    EXPECT_EQ(stats().used, kSize / kMiB - 3);
    // The one read from, the ones ahead; the rest were reused.
    EXPECT_LE(fs_->read_ahead().windows(), ReadAhead::kDepth + 1);
}

TEST_F(ReadAheadTest, AReadArrivingBeforeItsWindowFillsWaitsForIt) {
    start_with_windows_held();
    test::Reply r;
    TaskScope scope(loop_.get());
    scope.spawn(store(read_task(raw_, fh_, 3 * kMiB, kMiB), &r));
    idle(20);
    EXPECT_TRUE(r.data.empty());  // waiting for the window
    // At the disk: the windows at 3 and 4 MiB and the one the waiting read started at 5 MiB,
    // but not the waiting read itself.
    EXPECT_EQ(gate_of("vm.qcow2")->waiting(), 3);
    release_gates();
    run(join(&scope));
    ASSERT_EQ(r.error, 0);
    EXPECT_TRUE(r.data == expected(3 * kMiB, kMiB));
    EXPECT_EQ(stats().used, 1U);
    EXPECT_EQ(stats().waited, 1U);
    EXPECT_EQ(stats().started, 3U);
}

TEST_F(ReadAheadTest, AWriteIntoAFilledWindowIsSeen) {
    start_with_data();
    read_checked(0, kMiB);
    read_checked(kMiB, kMiB);
    read_checked(2 * kMiB, kMiB);
    idle(5);  // the window at 3 MiB is filled
    write(3 * kMiB + 4096, pattern(8192, 99));
    read_checked(3 * kMiB, kMiB);
    EXPECT_EQ(stats().used, 0U);
}

TEST_F(ReadAheadTest, AWriteWhileTheWindowFillsIsSeen) {
    start_with_windows_held();
    write(3 * kMiB, pattern(4096, 42));  // writes pass the gate
    release_gates();
    read_checked(3 * kMiB, kMiB);
    EXPECT_EQ(stats().used, 0U);
    // The reader goes on in order and is served from windows again.
    for (uint64_t off = 4 * kMiB; off < 7 * kMiB; off += kMiB) {
        read_checked(off, kMiB);
        idle(5);
    }
    EXPECT_GE(stats().used, 2U);
}

// A read ahead that failed serves nothing: the client's read goes to the disk and gets what
// the disk gives now, and the failure the client never saw is not the image's last one.
TEST_F(ReadAheadTest, AFailedWindowSendsTheReadToTheDisk) {
    start_with_windows_held();
    gate_of("vm.qcow2")->fail_reads = EIO;
    release_gates();
    idle(5);  // the windows at 3 and 4 MiB fail
    gate_of("vm.qcow2")->fail_reads = 0;
    read_checked(3 * kMiB, kMiB);
    EXPECT_EQ(stats().used, 0U);
    EXPECT_EQ(read_text(".control/vm/info").find("failed (injected)"), std::string::npos);
    // A client's read that fails is (the check above can see one).
    gate_of("vm.qcow2")->fail_reads = EIO;
    EXPECT_EQ(run(read_task(raw_, fh_, 9 * kMiB, 4096)).error, EIO);
    gate_of("vm.qcow2")->fail_reads = 0;
    EXPECT_NE(read_text(".control/vm/info").find("failed (injected)"), std::string::npos);
}

TEST_F(ReadAheadTest, ADrainedSectionMakesAWindowUnusable) {
    start_with_data();
    read_checked(0, kMiB);
    read_checked(kMiB, kMiB);
    read_checked(2 * kMiB, kMiB);
    idle(5);
    ASSERT_EQ(control(".control/vm/snapshot", "s1\n"), 0);  // a drained graph change
    write(3 * kMiB, pattern(4096, 7));                      // into the new top
    read_checked(3 * kMiB, kMiB);
    EXPECT_EQ(stats().used, 0U);
}

TEST_F(ReadAheadTest, AHolePunchedIntoAWindowReadsAsZeros) {
    start_with_data();
    read_in_order(3);  // windows at 3 and 4 MiB, filled
    test::Reply r = run(fallocate_task(raw_, fh_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                       3 * kMiB + 65536, 65536));
    ASSERT_EQ(r.error, 0);
    std::fill_n(model_.begin() + 3 * kMiB + 65536, 65536, 0);
    read_checked(3 * kMiB, kMiB);
    EXPECT_EQ(stats().used, 0U);
}

// Revert needs the image closed, but a stream's windows belong to the image, not the file:
// closing drops them, and a revert (a drained section) would make them unusable anyway.
TEST_F(ReadAheadTest, ClosingDropsTheWindowsAndARevertedImageIsReadAfresh) {
    start_with_data();
    ASSERT_EQ(control(".control/vm/snapshot", "s1\n"), 0);
    read_in_order(3);
    write(3 * kMiB, pattern(4096, 5));  // into the overlay the revert drops
    const std::vector<uint8_t> after_snapshot = pattern(kSize, 1);
    read_in_order(6);
    EXPECT_GT(fs_->read_ahead().windows(), 0U);
    release(raw_, fh_);
    EXPECT_EQ(fs_->read_ahead().windows(), 0U);
    ASSERT_EQ(control(".control/vm/revert", "\n"), 0);
    model_ = after_snapshot;
    fh_ = open(raw_, O_RDWR);
    const uint64_t used = stats().used;
    read_checked(3 * kMiB, kMiB);
    read_checked(4 * kMiB, kMiB);
    EXPECT_EQ(stats().used, used);
}

// In a Ceph pool another host may write an image this one serves: nothing is read ahead.
TEST_F(ReadAheadTest, AStoreSharedBetweenHostsIsNotReadAhead) {
    class SharedStore final : public test::ForwardingStore {
      public:
        explicit SharedStore(std::unique_ptr<Store> inner) : ForwardingStore(std::move(inner)) {
            caps_ = ForwardingStore::caps();
            caps_.shared_between_hosts = true;
        }
        [[nodiscard]] const StoreCaps& caps() const override { return caps_; }

      private:
        StoreCaps caps_;
    };
    wrap_store_ = [](std::unique_ptr<Store> inner) -> std::unique_ptr<Store> {
        return std::make_unique<SharedStore>(std::move(inner));
    };
    start_with_data();
    read_in_order(6);
    EXPECT_EQ(stats().started, 0U);
    EXPECT_EQ(fs_->read_ahead().windows(), 0U);
}

TEST_F(ReadAheadTest, OutOfOrderSmallAndOverlappingReadsStartNothing) {
    start_with_data();
    // Small reads in order.
    for (uint64_t off = 0; off < 64 * 4096; off += 4096) {
        read_checked(off, 4096);
    }
    // Large reads out of order.
    for (uint64_t off : {5 * kMiB, 3 * kMiB, 9 * kMiB, 1 * kMiB}) {
        read_checked(off, kMiB);
    }
    // Two in-order readers at once: each read arrives with another in flight.
    TaskScope scope(loop_.get());
    std::vector<test::Reply> replies(4);
    for (size_t i = 0; i < replies.size(); ++i) {
        scope.spawn(store(read_task(raw_, fh_, 10 * kMiB + i * kMiB, kMiB), &replies[i]));
    }
    run(join(&scope));
    for (size_t i = 0; i < replies.size(); ++i) {
        EXPECT_TRUE(replies[i].data == expected(10 * kMiB + i * kMiB, kMiB));
    }
    EXPECT_EQ(stats().started, 0U);
    EXPECT_EQ(fs_->read_ahead().windows(), 0U);
}

TEST_F(ReadAheadTest, AReaderThatLeavesTheOrderDropsItsWindows) {
    start_with_data();
    for (uint64_t off = 0; off < 4 * kMiB; off += kMiB) {
        read_checked(off, kMiB);
        idle(5);
    }
    EXPECT_GT(fs_->read_ahead().windows(), 0U);
    read_checked(12 * kMiB, kMiB);
    EXPECT_EQ(fs_->read_ahead().windows(), 0U);
}

TEST_F(ReadAheadTest, TheLastWindowStopsAtTheEndOfTheDisk) {
    start_with_data();
    const uint64_t tail = kSize - kMiB - 512 * 1024;
    read_checked(tail - 3 * kMiB, kMiB);
    read_checked(tail - 2 * kMiB, kMiB);
    read_checked(tail - kMiB, kMiB);
    idle(5);
    read_checked(tail, kMiB);  // from the window
    idle(5);
    read_checked(tail + kMiB, 512 * 1024);  // the rest, from a window cut at the end
    EXPECT_EQ(stats().used, 2U);
    test::Reply past = run(read_task(raw_, fh_, kSize, kMiB));
    EXPECT_EQ(past.error, 0);
    EXPECT_TRUE(past.data.empty());
}

TEST_F(ReadAheadTest, WindowsAreCappedOverManyImages) {
    constexpr int kImages = 6;
    for (int i = 0; i < kImages; ++i) {
        make_qcow2("vm" + std::to_string(i) + ".qcow2", 8 * kMiB);
    }
    start();
    std::vector<uint64_t> inos;
    std::vector<uint64_t> fhs;
    for (int i = 0; i < kImages; ++i) {
        inos.push_back(ino("vm" + std::to_string(i) + ".raw"));
        fhs.push_back(open(inos.back(), O_RDONLY));
    }
    for (uint64_t off = 0; off < 6 * kMiB; off += kMiB) {
        for (int i = 0; i < kImages; ++i) {
            test::Reply r = run(read_task(inos[i], fhs[i], off, kMiB));
            ASSERT_EQ(r.error, 0);
            ASSERT_TRUE(
                std::all_of(r.data.begin(), r.data.end(), [](uint8_t b) { return b == 0; }));
            EXPECT_LE(fs_->read_ahead().windows(), ReadAhead::kMaxWindows);
        }
        idle(5);
    }
    EXPECT_GT(stats().used, 0U);
    for (int i = 0; i < kImages; ++i) {
        release(inos[i], fhs[i]);
    }
}

}  // namespace
}  // namespace imgfs
