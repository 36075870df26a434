// The file driver on real temporary files.
#include "drivers/file.h"

#include <algorithm>
#include <csignal>
#include <fcntl.h>
#include <random>
#include <unistd.h>

#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/statfs.h>
#include <sys/syscall.h>

#include "core/task_scope.h"
#include "core/transaction.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

class FileTest : public test::LoopTest {
  public:
    std::shared_ptr<FileNode> open_file(const std::string& path, FileOptions opts = {}) {
        UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
        EXPECT_TRUE(fd.valid());
        if (opts.direct) {
            auto r = FileNode::open(env(), path, AT_FDCWD, path, opts);
            EXPECT_TRUE(r.ok()) << r.error().message();
            return r.ok() ? *r : nullptr;
        }
        auto r = FileNode::from_fd(env(), path, std::move(fd), opts);
        EXPECT_TRUE(r.ok()) << r.error().message();
        return *r;
    }
};

std::vector<uint8_t> slurp(const std::string& path) {
    std::vector<uint8_t> v;
    UniqueFd fd(::open(path.c_str(), O_RDONLY));
    uint8_t buf[65536];
    ssize_t n = 0;
    while ((n = ::read(fd.get(), buf, sizeof buf)) > 0) {
        v.insert(v.end(), buf, buf + n);
    }
    return v;
}

// Applies the same seeded operations through the node and through pread/pwrite on a reference
// file, checking every read against the reference as it goes.
Task<Status> mirror_ops(FileNode* node, int ref_fd, uint64_t seed, int count, uint64_t span) {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < count; ++i) {
        uint64_t off = rng() % span;
        uint64_t len = 1 + rng() % (rng() % 4 == 0 ? 300000 : 9000);
        std::vector<uint8_t> buf;
        if (rng() % 2 == 0) {
            buf = test::random_bytes(&rng, len);
            CO_TRY(co_await node->write(off, buf));
            if (::pwrite(ref_fd, buf.data(), len, static_cast<off_t>(off)) !=
                static_cast<ssize_t>(len)) {
                co_return make_error(errno, "reference pwrite");
            }
        } else {
            buf.resize(len);
            CO_TRY(co_await node->read(off, buf));
            std::vector<uint8_t> ref(len, 0);
            ssize_t n = ::pread(ref_fd, ref.data(), len, static_cast<off_t>(off));
            if (n < 0) {
                co_return make_error(errno, "reference pread");
            }
            if (buf != ref) {
                co_return make_error(EIO, "read mismatch at op {} ({} bytes at {})", i, len, off);
            }
        }
    }
    co_return co_await node->flush();
}

void run_mirror(FileTest* t, test::TempDir* dir, FileOptions opts) {
    auto node = t->open_file(dir->file("node"), opts);
    ASSERT_NE(node, nullptr);
    UniqueFd ref(::open(dir->file("ref").c_str(), O_RDWR | O_CREAT, 0600));
    Status st = sync_wait(node->env().loop, mirror_ops(node.get(), ref.get(), 42, 10000, 8 << 20));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(node->size(), slurp(dir->file("ref")).size());
    EXPECT_TRUE(slurp(dir->file("node")) == slurp(dir->file("ref")));
}

TEST_F(FileTest, TenThousandRandomOpsMatchPreadPwrite) {
    test::TempDir dir;
    run_mirror(this, &dir, {});
}

#define REQUIRE_SHM()                                                   \
    if (test::memory_backed() != "/dev/shm") {                          \
        if (test::in_ci()) {                                            \
            FAIL() << "/dev/shm is not writable";                       \
        }                                                               \
        GTEST_SKIP() << "no writable /dev/shm (CI unset, so skipping)"; \
    }

// Images on tmpfs (io_uring hands every read of it to a worker thread): the same results.
TEST_F(FileTest, TenThousandRandomOpsMatchOnTmpfs) {
    REQUIRE_SHM();
    test::TempDir dir(test::memory_backed());
    run_mirror(this, &dir, {});
}

bool o_direct_possible(test::TempDir* dir) {
    return UniqueFd(::open(dir->file("probe").c_str(), O_RDWR | O_CREAT | O_DIRECT, 0600)).valid();
}

#define REQUIRE_O_DIRECT(dir)                                                \
    if (!o_direct_possible(dir)) {                                           \
        if (test::in_ci()) {                                                 \
            FAIL() << "O_DIRECT unsupported on " << (dir)->path();           \
        }                                                                    \
        GTEST_SKIP() << "O_DIRECT unsupported here (CI unset, so skipping)"; \
    }

TEST_F(FileTest, TenThousandRandomOpsMatchWithODirect) {
    test::TempDir dir;
    REQUIRE_O_DIRECT(&dir);
    run_mirror(this, &dir, FileOptions{false, true});
}

// Pages of `fd`'s file in [offset, offset + bytes) that the page cache holds (cachestat(2),
// which Debian 12's headers predate; 451 on every architecture).
uint64_t cached_pages(int fd, uint64_t offset, uint64_t bytes) {
    uint64_t range[2] = {offset, bytes};
    uint64_t stat[5] = {};
    EXPECT_EQ(::syscall(451, fd, range, stat, 0), 0) << strerror(errno);
    return stat[0];
}

// Whether reads that miss the page cache can go direct in `dir`: cachestat (Linux 6.5),
// O_DIRECT with a known alignment, and a cache that POSIX_FADV_DONTNEED empties (not tmpfs).
bool direct_reads_possible(test::TempDir* dir) {
    UniqueFd fd(::open(dir->file("probe").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    struct statx stx {};
    uint64_t range[2] = {0, 4096};
    uint64_t stat[5] = {};
    return fd.valid() && ::pwrite(fd.get(), "x", 1, 0) == 1 && ::fdatasync(fd.get()) == 0 &&
           ::statx(fd.get(), "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
           (stx.stx_mask & STATX_DIOALIGN) != 0 && stx.stx_dio_offset_align != 0 &&
           ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED) == 0 &&
           ::syscall(451, fd.get(), range, stat, 0) == 0 && stat[0] == 0;
}

#define REQUIRE_DIRECT_READS(dir)                                                    \
    if (!direct_reads_possible(dir)) {                                               \
        if (test::in_ci()) {                                                         \
            FAIL() << "cold reads cannot go direct in " << (dir)->path();            \
        }                                                                            \
        GTEST_SKIP() << "no cachestat, O_DIRECT or droppable cache here (CI unset)"; \
    }

// Writes `data` at 0 through `node`, makes it durable and drops it from the page cache, so
// that the next reads of it miss.
void write_and_drop(FileNode* node, const std::vector<uint8_t>& data) {
    Status st = sync_wait(node->env().loop, node->write(0, data));
    ASSERT_TRUE(st) << st.error().message();
    st = sync_wait(node->env().loop, node->flush());
    ASSERT_TRUE(st) << st.error().message();
    ASSERT_EQ(::posix_fadvise(node->fd(), 0, 0, POSIX_FADV_DONTNEED), 0);
}

// Aligned reads and writes, with the clean pages dropped from the cache now and then, so that
// reads find the range cached, missing, or partly cached and partly dirty.
Task<Status> mirror_with_eviction(FileNode* node, int ref_fd, uint64_t seed, int count,
                                  int* reads) {
    std::mt19937_64 rng(seed);
    const uint64_t span_blocks = 2048;  // 8 MiB of 4 KiB blocks
    AlignedBuffer buf(256 << 10);
    for (int i = 0; i < count; ++i) {
        const uint64_t off = (rng() % span_blocks) * 4096;
        const size_t len = (1 + rng() % 64) * 4096;
        const MutBuf part = buf.subspan(0, len);
        if (rng() % 3 == 0) {
            for (uint8_t& b : part) {
                b = static_cast<uint8_t>(rng());
            }
            CO_TRY(co_await node->write(off, part));
            if (::pwrite(ref_fd, part.data(), len, static_cast<off_t>(off)) !=
                static_cast<ssize_t>(len)) {
                co_return make_error(errno, "reference pwrite");
            }
        } else {
            ++*reads;
            CO_TRY(co_await node->read(off, part));
            std::vector<uint8_t> ref(len, 0);
            if (::pread(ref_fd, ref.data(), len, static_cast<off_t>(off)) < 0) {
                co_return make_error(errno, "reference pread");
            }
            if (!std::equal(ref.begin(), ref.end(), part.begin())) {
                co_return make_error(EIO, "read mismatch at op {} ({} bytes at {})", i, len, off);
            }
        }
        if (rng() % 40 == 0) {
            ::posix_fadvise(node->fd(), 0, 0, POSIX_FADV_DONTNEED);  // drops clean pages only
        }
        if (rng() % 100 == 0) {
            CO_TRY(co_await node->flush());
        }
    }
    co_return co_await node->flush();
}

TEST_F(FileTest, ReadsOfWhatTheCacheLacksGoDirectAndMatchPreadPwrite) {
    test::TempDir dir;
    REQUIRE_DIRECT_READS(&dir);
    auto node = open_file(dir.file("node"));
    ASSERT_NE(node, nullptr);
    UniqueFd ref(::open(dir.file("ref").c_str(), O_RDWR | O_CREAT, 0600));
    int reads = 0;
    Status st =
        sync_wait(node->env().loop, mirror_with_eviction(node.get(), ref.get(), 9, 4000, &reads));
    ASSERT_TRUE(st) << st.error().message();
    // Both paths ran: some reads found their range cached, others did not.
    EXPECT_GT(node->direct_reads(), 100U);
    EXPECT_LT(node->direct_reads(), static_cast<uint64_t>(reads) - 100);
    EXPECT_TRUE(slurp(dir.file("node")) == slurp(dir.file("ref")));
}

// A read of what the cache does not hold leaves it out of the cache; what it holds is read
// from it; a read the direct path cannot take (unaligned, or cut at an unaligned EOF by the
// generic layer) is buffered.
TEST_F(FileTest, ADirectReadLeavesTheCacheAlone) {
    test::TempDir dir;
    REQUIRE_DIRECT_READS(&dir);
    auto node = open_file(dir.file("node"));
    ASSERT_NE(node, nullptr);
    std::mt19937_64 rng(3);
    const std::vector<uint8_t> data = test::random_bytes(&rng, 3 * 4096 + 100);
    ASSERT_NO_FATAL_FAILURE(write_and_drop(node.get(), data));
    ASSERT_EQ(cached_pages(node->fd(), 0, 16384), 0U);

    AlignedBuffer buf(16384);
    Status st = sync_wait(node->env().loop, node->read(0, buf.subspan(0, 12288)));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(node->direct_reads(), 1U);
    EXPECT_TRUE(std::equal(data.begin(), data.begin() + 12288, buf.data()));
    EXPECT_EQ(cached_pages(node->fd(), 0, 16384), 0U);

    // Unaligned: buffered, so the page it touches is cached now.
    std::vector<uint8_t> small(10);
    st = sync_wait(node->env().loop, node->read(4196, small));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_TRUE(std::equal(small.begin(), small.end(), data.begin() + 4196));
    EXPECT_EQ(node->direct_reads(), 1U);
    EXPECT_EQ(cached_pages(node->fd(), 4096, 4096), 1U);

    // Cached: read from the cache. Partly cached: direct.
    st = sync_wait(node->env().loop, node->read(4096, buf.subspan(0, 4096)));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(node->direct_reads(), 1U);
    st = sync_wait(node->env().loop, node->read(0, buf.subspan(0, 8192)));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(node->direct_reads(), 2U);
    EXPECT_TRUE(std::equal(data.begin(), data.begin() + 8192, buf.data()));

    // Across the end of the file: cut at 12,388 bytes, buffered, zeros after it.
    std::memset(buf.data(), 0xee, buf.size());
    st = sync_wait(node->env().loop, node->read(8192, buf.subspan(0, 8192)));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(node->direct_reads(), 2U);
    EXPECT_TRUE(std::equal(data.begin() + 8192, data.end(), buf.data()));
    EXPECT_TRUE(std::all_of(buf.data() + (data.size() - 8192), buf.data() + 8192,
                            [](uint8_t b) { return b == 0; }));
}

// Pages of `fd`'s file in [offset, offset + bytes) that are dirty and not yet being written.
uint64_t dirty_pages(int fd, uint64_t offset, uint64_t bytes) {
    uint64_t range[2] = {offset, bytes};
    uint64_t stat[5] = {};
    EXPECT_EQ(::syscall(451, fd, range, stat, 0), 0) << strerror(errno);
    return stat[1];
}

// A large buffered write starts its own writeback, so that the fsync which ends a stream of
// them finds most of it on its way to the disk; small writes (qcow2 metadata among them) stay
// dirty for the kernel to write when it likes.
TEST_F(FileTest, LargeBufferedWritesStartTheirWriteback) {
    test::TempDir dir;  // on a disk: tmpfs has no writeback
    REQUIRE_DIRECT_READS(&dir);
    auto node = open_file(dir.file("node"));
    ASSERT_NE(node, nullptr);
    std::mt19937_64 rng(5);
    const std::vector<uint8_t> small = test::random_bytes(&rng, 64 << 10);
    const std::vector<uint8_t> large = test::random_bytes(&rng, FileNode::kWriteBehindMin);
    Status st = sync_wait(node->env().loop, node->write(0, small));
    ASSERT_TRUE(st) << st.error().message();
    st = sync_wait(node->env().loop, node->write(1 << 20, large));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(dirty_pages(node->fd(), 0, small.size()), small.size() / 4096);
    EXPECT_EQ(dirty_pages(node->fd(), 1 << 20, large.size()), 0U);
    EXPECT_TRUE(slurp(dir.file("node")).size() == (1 << 20) + large.size());
}

// A layer two images read (a shared base) keeps its cold reads in the host's cache, which
// then serves both; a layer one image reads does not.
TEST_F(FileTest, ALayerSeveralImagesReadKeepsColdReadsInTheCache) {
    test::TempDir dir;
    REQUIRE_DIRECT_READS(&dir);
    auto file = open_file(dir.file("node"));
    ASSERT_NE(file, nullptr);
    std::mt19937_64 rng(5);
    const std::vector<uint8_t> data = test::random_bytes(&rng, 8192);
    ASSERT_NO_FATAL_FAILURE(write_and_drop(file.get(), data));

    auto layer = std::make_shared<test::MemNode>(env(), "base", 1 << 20);
    auto vm1 = std::make_shared<test::MemNode>(env(), "vm1", 1 << 20);
    auto vm2 = std::make_shared<test::MemNode>(env(), "vm2", 1 << 20);
    {
        Transaction tx(&graph_);
        tx.attach(layer.get(), file, ChildRole::kFile, "file");
        tx.attach(vm1.get(), layer, ChildRole::kBacking, "backing");
        ASSERT_TRUE(tx.commit().ok());
    }
    AlignedBuffer buf(4096);
    Status st = sync_wait(file->env().loop, file->read(0, buf.span()));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(file->direct_reads(), 1U);  // one image: direct
    {
        Transaction tx(&graph_);
        tx.attach(vm2.get(), layer, ChildRole::kBacking, "backing");
        ASSERT_TRUE(tx.commit().ok());
    }
    st = sync_wait(file->env().loop, file->read(4096, buf.span()));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(file->direct_reads(), 1U);  // two: buffered, and cached now
    EXPECT_EQ(cached_pages(file->fd(), 4096, 4096), 1U);
    EXPECT_TRUE(std::equal(data.begin() + 4096, data.end(), buf.data()));
}

// A descriptor opened without O_DIRECT (a snapshot's new overlay, which the store creates)
// gets it when the node is to do direct I/O.
// Small buffered writes are made with pwrite on the loop's thread; a run of them that never lets
// the loop reap anything is cut short (one goes through the ring now and then), larger writes and
// O_DIRECT ones always go through the ring. The data is the same either way.
Task<Status> many_small_writes(FileNode* node, int count, std::vector<uint8_t>* expect) {
    std::mt19937_64 rng(7);
    for (int i = 0; i < count; ++i) {
        const uint64_t off = (rng() % 256) * 4096;
        std::vector<uint8_t> data = test::random_bytes(&rng, 4096);
        std::copy(data.begin(), data.end(), expect->begin() + static_cast<ptrdiff_t>(off));
        CO_TRY(co_await node->write(off, data));
    }
    co_return co_await node->flush();
}

// Buffered writes go inline on ext4 and tmpfs only (elsewhere io_uring makes them without a
// worker thread already).
bool inline_writes_possible(test::TempDir* dir) {
    struct statfs fs {};
    return ::statfs(dir->path().c_str(), &fs) == 0 &&
           (fs.f_type == EXT4_SUPER_MAGIC || fs.f_type == TMPFS_MAGIC);
}

#define REQUIRE_INLINE_WRITES(dir)                                                  \
    if (!inline_writes_possible(dir)) {                                             \
        if (test::in_ci()) {                                                        \
            FAIL() << (dir)->path() << " is neither ext4 nor tmpfs";                \
        }                                                                           \
        GTEST_SKIP() << "writes are not made inline here (neither ext4 nor tmpfs)"; \
    }

// The same, alternating between two files of one loop: the bound is the loop's.
Task<Status> alternating_writes(FileNode* a, FileNode* b, int count) {
    std::vector<uint8_t> data(4096, 9);
    for (int i = 0; i < count; ++i) {
        CO_TRY(co_await (i % 2 == 0 ? a : b)->write(static_cast<uint64_t>(i / 2) * 4096, data));
    }
    co_return Status{};
}

TEST_F(FileTest, SmallBufferedWritesAreMadeInlineButNeverTooManyInARow) {
    test::TempDir dir;
    REQUIRE_INLINE_WRITES(&dir);
    FileOptions no_stalls;
    no_stalls.inline_sleep_budget_us = UINT32_MAX;  // a slow journal on a busy host must not count
    auto node = open_file(dir.file("f"), no_stalls);
    ASSERT_NE(node, nullptr);
    std::vector<uint8_t> expect(1 << 20, 0);
    Status st = run(many_small_writes(node.get(), 1000, &expect));
    ASSERT_TRUE(st) << st.error().message();
    // 256 per turn of the loop: the 257th goes through the ring, and its completion is a turn.
    EXPECT_EQ(node->inline_ops(), 1000U - 1000U / 257U);
    EXPECT_TRUE(slurp(dir.file("f")) == expect);

    auto other = open_file(dir.file("g"), no_stalls);
    ASSERT_NE(other, nullptr);
    const uint64_t first_before = node->inline_ops();
    st = run(alternating_writes(node.get(), other.get(), 600));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(node->inline_ops() - first_before + other->inline_ops(), 600U - 600U / 257U)
        << "the bound of calls per turn is not shared by the loop's files";

    const uint64_t before = node->inline_ops();
    ASSERT_TRUE(run(node->write(0, std::vector<uint8_t>(128 * 1024, 3))));
    EXPECT_EQ(node->inline_ops(), before) << "a 128 KiB write was made inline";

    test::TempDir direct_dir;
    REQUIRE_O_DIRECT(&direct_dir);
    auto direct = open_file(direct_dir.file("d"), FileOptions{false, true});
    ASSERT_NE(direct, nullptr);
    AlignedBuffer block(4096);
    std::fill(block.span().begin(), block.span().end(), 5);
    ASSERT_TRUE(run(direct->write(0, block.span())));
    EXPECT_EQ(direct->inline_ops(), 0U) << "an O_DIRECT write was made on the loop's thread";
}

// io_uring hands every read of a tmpfs file to a worker thread, so those are made on the loop's
// thread too (up to 64 KiB); on a disk-backed filesystem reads stay on the ring.
TEST_F(FileTest, ReadsOfAFileOnTmpfsAreMadeInline) {
    REQUIRE_SHM();
    test::TempDir shm(test::memory_backed());
    auto node = open_file(shm.file("f"));
    ASSERT_NE(node, nullptr);
    std::vector<uint8_t> data(8192);
    for (size_t i = 0; i < data.size(); ++i) {
        data[i] = static_cast<uint8_t>(i * 7 + 3);
    }
    ASSERT_TRUE(run(node->write(0, data)));
    const uint64_t after_write = node->inline_ops();
    std::vector<uint8_t> got(4096, 0x55);
    ASSERT_TRUE(run(node->read(0, got)));
    EXPECT_TRUE(std::equal(got.begin(), got.end(), data.begin()));
    EXPECT_EQ(node->inline_ops(), after_write + 1);
    // Across the end of the file: the rest reads as zeros.
    std::fill(got.begin(), got.end(), 0x55);
    ASSERT_TRUE(run(node->read(6144, got)));
    EXPECT_TRUE(std::equal(got.begin(), got.begin() + 2048, data.begin() + 6144));
    EXPECT_TRUE(std::all_of(got.begin() + 2048, got.end(), [](uint8_t b) { return b == 0; }));
    EXPECT_EQ(node->inline_ops(), after_write + 2);
    std::vector<uint8_t> large(128 * 1024);
    ASSERT_TRUE(run(node->write(64 * 1024, large)));  // through the ring: too large
    ASSERT_TRUE(run(node->read(0, large)));
    EXPECT_EQ(node->inline_ops(), after_write + 2) << "a 128 KiB read or write was made inline";

    test::TempDir disk;
    auto on_disk = open_file(disk.file("f"));
    ASSERT_NE(on_disk, nullptr);
    ASSERT_TRUE(run(on_disk->write(0, data)));
    const uint64_t disk_writes = on_disk->inline_ops();
    ASSERT_TRUE(run(on_disk->read(0, got)));
    EXPECT_EQ(on_disk->inline_ops(), disk_writes) << "a read on " << disk.path() << " was inline";
}

// A write that sleeps in the kernel (here: its source is a mapped page that must be read from
// the disk; in life, dirty-page throttling or a journal wait) stops inline writes for a while,
// so a disk that falls behind does not hold up the whole loop write after write.
TEST_F(FileTest, AnInlineWriteThatSleepsTurnsThemOffForAWhile) {
    test::TempDir dir;
    REQUIRE_DIRECT_READS(&dir);  // the same needs: a cache that DONTNEED empties
    const std::string src = dir.file("src");
    UniqueFd src_fd(::open(src.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    ASSERT_TRUE(src_fd.valid());
    std::vector<uint8_t> pattern(65536);
    for (size_t i = 0; i < pattern.size(); ++i) {
        pattern[i] = static_cast<uint8_t>(i * 13 + 1);
    }
    ASSERT_EQ(::pwrite(src_fd.get(), pattern.data(), pattern.size(), 0), 65536);
    ASSERT_EQ(::fdatasync(src_fd.get()), 0);
    ASSERT_EQ(::posix_fadvise(src_fd.get(), 0, 0, POSIX_FADV_DONTNEED), 0);
    ASSERT_EQ(cached_pages(src_fd.get(), 0, 65536), 0U);
    void* map = ::mmap(nullptr, 65536, PROT_READ, MAP_SHARED, src_fd.get(), 0);
    ASSERT_NE(map, MAP_FAILED);
    const ConstBuf cold(static_cast<const uint8_t*>(map), 65536);

    REQUIRE_INLINE_WRITES(&dir);
    FileOptions opts;
    opts.inline_sleep_budget_us = 0;  // any sleep is a stall
    auto node = open_file(dir.file("f"), opts);
    ASSERT_NE(node, nullptr);
    ASSERT_TRUE(run(node->write(0, cold.subspan(0, 4096))));
    EXPECT_EQ(node->inline_ops(), 1U);
    EXPECT_GE(node->inline_stalls(), 1U) << "a write that read its source from the disk "
                                            "did not count as a stall";
    // The cool-off is a second: the next writes go through the ring.
    for (size_t off = 4096; off < 65536; off += 4096) {
        ASSERT_TRUE(run(node->write(off, cold.subspan(off, 4096))));
    }
    EXPECT_EQ(node->inline_ops(), 1U) << "inline writes went on after a stall";
    // The cool-off is the loop's: another file's writes wait it out too.
    auto other = open_file(dir.file("g"), opts);
    ASSERT_NE(other, nullptr);
    ASSERT_TRUE(run(other->write(0, pattern)));
    EXPECT_EQ(other->inline_ops(), 0U) << "another file of the loop wrote inline after a stall";
    std::vector<uint8_t> got = slurp(dir.file("f"));
    EXPECT_TRUE(got == pattern);
    ::munmap(map, 65536);
}

TEST_F(FileTest, ADescriptorHandedOverForDirectIoGetsODirect) {
    test::TempDir dir;
    UniqueFd fd(::open(dir.file("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd.valid());
    const int raw_fd = fd.get();
    auto node = FileNode::from_fd(env(), "f", std::move(fd), FileOptions{false, true});
    if (!node.ok()) {
        if (test::in_ci() || node.error().errnum != EINVAL) {
            FAIL() << node.error().message();
        }
        GTEST_SKIP() << "O_DIRECT unsupported here (CI unset, so skipping)";
    }
    EXPECT_NE(::fcntl(raw_fd, F_GETFL) & O_DIRECT, 0);
    EXPECT_EQ((*node)->limits().request_alignment % 512, 0U);
}

Task<Status> zero_and_status(FileNode* node, std::vector<BlockStatus>* out) {
    std::vector<uint8_t> data(1 << 20, 0x5a);
    CO_TRY(co_await node->write(0, data));
    CO_TRY(co_await node->write_zeroes(256 << 10, 256 << 10, true));  // punches a hole
    CO_TRY(co_await node->discard(768 << 10, 4096));
    CO_TRY(co_await node->write_zeroes((2 << 20) - 100, 100, false));  // past EOF: grows
    for (uint64_t off = 0; off < node->size();) {
        CO_TRY_ASSIGN(BlockStatus st, co_await node->block_status(off, node->size() - off));
        out->push_back(st);
        off += st.bytes;
    }
    co_return Status{};
}

TEST_F(FileTest, ZeroesHolesAndBlockStatus) {
    test::TempDir dir;
    auto node = open_file(dir.file("f"));
    std::vector<BlockStatus> map;
    Status st = run(zero_and_status(node.get(), &map));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(node->size(), 2U << 20);
    std::vector<uint8_t> content = slurp(dir.file("f"));
    ASSERT_EQ(content.size(), 2U << 20);
    EXPECT_EQ(content[0], 0x5a);
    EXPECT_EQ(content[256 << 10], 0);
    EXPECT_EQ(content[(512 << 10) - 1], 0);
    EXPECT_EQ(content[512 << 10], 0x5a);
    EXPECT_EQ(content[768 << 10], 0);
    ASSERT_GE(map.size(), 3U);
    EXPECT_EQ(map[0].alloc, Alloc::kData);
    EXPECT_EQ(map[0].bytes, 256U << 10);
    EXPECT_EQ(map[1].alloc, Alloc::kZero);
    EXPECT_EQ(map.back().alloc, Alloc::kZero);  // the grown tail is a hole
}

Task<void> flush_into(FileNode* node, Status* out) {
    *out = co_await node->flush();
}

Task<void> flush_twice_at_once(FileNode* node, Status* first, Status* second) {
    TaskScope scope(node->env().loop);
    scope.spawn(flush_into(node, first));
    scope.spawn(flush_into(node, second));
    co_await scope.join();
}

// The kernel reports a writeback error to one fdatasync only. A flush that ran beside the one
// that got it must not report success for the data that error says is lost.
TEST_F(FileTest, AFlushBesideTheOneThatFailedFailsToo) {
    test::TempDir dir;
    const std::string path = dir.file("f");
    FileOptions opts;
    opts.fail_fdatasync_errno = EIO;
    opts.fail_fdatasync_nth = 1;
    opts.fail_fdatasync_once = true;
    auto node = open_file(path, opts);
    use_rw(node);
    std::vector<uint8_t> data(4096, 7);
    ASSERT_TRUE(run(node->write(0, data)).ok());
    Status first;
    Status second;
    run(flush_twice_at_once(node.get(), &first, &second));
    ASSERT_FALSE(first.ok());
    EXPECT_EQ(first.error().errnum, EIO);
    ASSERT_FALSE(second.ok()) << "the second flush reported success for lost data";
    EXPECT_EQ(second.error().errnum, EIO);
    EXPECT_TRUE(node->failed());
}

TEST_F(FileTest, ReadOnlyRefusesWrites) {
    test::TempDir dir;
    {
        UniqueFd fd(::open(dir.file("f").c_str(), O_RDWR | O_CREAT, 0600));
        ASSERT_EQ(::ftruncate(fd.get(), 4096), 0);
    }
    auto r = FileNode::open(env(), "f", AT_FDCWD, dir.file("f"), FileOptions{true, false});
    ASSERT_TRUE(r.ok());
    std::vector<uint8_t> data(10, 1);
    Status st = run((*r)->write(0, data));
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EROFS);
    EXPECT_FALSE((*r)->check_perm(perm::kWrite, 0).ok());
}

TEST_F(FileTest, MissingFileNamesThePath) {
    auto r = FileNode::open(env(), "x", AT_FDCWD, "/nonexistent/imgfs/x", {});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().errnum, ENOENT);
    EXPECT_NE(r.error().message().find("/nonexistent/imgfs/x"), std::string::npos);
}

// A write that fails part way (the kernel writes up to a limit, then refuses: as ENOSPC after a
// short write) leaves its first bytes in the file past the size the node knows. Zeroing that
// range must still zero it, and a format driver must not take it for fresh space.
TEST_F(FileTest, WriteFailingPartWayIsNotTakenForZeros) {
    test::TempDir dir(test::memory_backed());
    const std::string path = dir.file("f");
    auto node = open_file(path);
    use_rw(node);
    std::vector<uint8_t> data(65536, 0xab);
    {
        ::signal(SIGXFSZ, SIG_IGN);
        rlimit limit{100000, RLIM_INFINITY};
        ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
        Status st = run(node->write(65536, data));
        rlimit none{RLIM_INFINITY, RLIM_INFINITY};
        ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &none), 0);
        ASSERT_FALSE(st.ok());
        EXPECT_EQ(st.error().errnum, EFBIG);
    }
    EXPECT_EQ(slurp(path).size(), 100000U);  // part of the write is in the file
    EXPECT_GE(node->zeros_from(), 131072U);
    ASSERT_TRUE(run(node->write_zeroes(65536, 65536, false)).ok());
    std::vector<uint8_t> got = slurp(path);
    ASSERT_EQ(got.size(), 131072U);
    EXPECT_TRUE(std::all_of(got.begin() + 65536, got.end(), [](uint8_t b) { return b == 0; }));
}

// Zeroing past the end the node knows grows the file without ftruncate: a write past that range
// which the kernel already did (its completion not yet reaped) must not be cut off.
TEST_F(FileTest, ZeroingPastTheKnownEndNeverShrinksTheFile) {
    test::TempDir dir(test::memory_backed());
    const std::string path = dir.file("f");
    auto node = open_file(path);
    use_rw(node);
    UniqueFd other(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    std::vector<uint8_t> data(4096, 0x5c);
    ASSERT_EQ(::pwrite(other.get(), data.data(), data.size(), 1 << 20), 4096);
    for (bool may_unmap : {false, true}) {
        ASSERT_TRUE(run(node->write_zeroes(may_unmap ? 131072 : 65536, 65536, may_unmap)).ok());
        std::vector<uint8_t> got = slurp(path);
        ASSERT_EQ(got.size(), (1U << 20) + 4096);
        EXPECT_EQ(got[1 << 20], 0x5c);
    }
    EXPECT_GE(node->size(), 196608U);
}

// Zeroing data the node wrote, with and without unmapping, at the end and inside the file.
TEST_F(FileTest, ZeroingWrittenDataReadsZeros) {
    test::TempDir dir(test::memory_backed());
    const std::string path = dir.file("f");
    auto node = open_file(path);
    use_rw(node);
    std::vector<uint8_t> data(262144, 0x77);
    ASSERT_TRUE(run(node->write(0, data)).ok());
    ASSERT_TRUE(run(node->write_zeroes(4096, 8192, false)).ok());
    ASSERT_TRUE(run(node->write_zeroes(65536, 65536, true)).ok());
    ASSERT_TRUE(run(node->write_zeroes(196608, 131072, false)).ok());  // past the end too
    std::vector<uint8_t> got = slurp(path);
    ASSERT_EQ(got.size(), 327680U);
    for (size_t i = 0; i < got.size(); ++i) {
        bool zero = (i >= 4096 && i < 12288) || (i >= 65536 && i < 131072) || i >= 196608;
        ASSERT_EQ(got[i], zero ? 0 : 0x77) << "at " << i;
    }
}

}  // namespace
}  // namespace imgfs
