// Crash harness for snapshot and commit (issue 6, item 3): a crash at every step of the job must
// leave an image directory that opens as before the job or as after it.
//
// Every image file the jobs write is opened through ImageSetOptions::wrap_file, which puts a
// RecorderNode (tests/qcow2/recorder_util.h) over it, keyed by inode, so hard links made while a
// chain is edited share one history. Directory fsyncs are observed through the
// ImageSetOptions::sync_dir_observer seam. Crash points: every request a recorder sees and
// every directory fsync. At each point the directory listing is recorded; a name created, removed
// or re-pointed since the last directory fsync may or may not survive, each independently (names
// are touched at most once between two fsyncs here, so comparing listings captures every such
// change). Four variants per point, as in the qcow2 harness: nothing unflushed survives (old names,
// dropped requests), everything issued survives, and two random mixes (one with a torn multi-sector
// write).
//
// Each distinct variant is written to a fresh directory, which must then scan with NAME exported,
// rooted at the before or the after file, reading the same guest content (snapshot and commit
// never change it), and every qcow2 image in it must pass our checker (check_qcow2); `qemu-img
// check` runs on every image of every 5th point, and must agree.
// The reopen of every crash state (scan, open, close) is recorded the same way, and a second
// crash at a random point of it, in a random variant, must also open as before or after.
// Not modelled: what a job writes with plain syscalls before a recorder wraps the file (the new
// overlay's initial content, written and fsynced by qcow2::create_image under a hidden name and
// then renamed into place); InterruptedOverlayCreation covers what a crash there can leave.
#include <chrono>
#include <dirent.h>
#include <fcntl.h>
#include <map>
#include <unistd.h>

#include <gtest/gtest.h>
#include <sys/stat.h>

#include "core/transaction.h"
#include "drivers/file.h"
#include "drivers/local_store.h"
#include "jobs/chain_edit.h"
#include "jobs/image_set.h"
#include "jobs/job_manager.h"
#include "qcow2/image_test_util.h"
#include "qcow2/recorder_util.h"

namespace imgfs {
namespace {

using test::Variant;
using Listing = std::map<std::string, ino_t>;

constexpr uint64_t kGuest = 4ULL << 20;

enum class JobKind { kSnapshot, kCommit, kStream };

Listing list_dir(int dir_fd) {
    Listing out;
    DIR* d = ::fdopendir(::dup(dir_fd));
    ::rewinddir(d);
    while (dirent* ent = ::readdir(d)) {
        struct stat st {};
        std::string name = ent->d_name;
        if (name != "." && name != ".." && ::fstatat(dir_fd, name.c_str(), &st, 0) == 0) {
            out[name] = st.st_ino;
        }
    }
    ::closedir(d);
    return out;
}

struct Point {
    uint64_t seq;
    Listing listing;
    Listing durable;
};

// Everything recorded while a job ran.
struct World {
    test::Clock clock;
    int dir_fd = -1;
    Listing durable;
    std::map<ino_t, std::unique_ptr<test::Journal>> journals;
    std::vector<Point> points;

    void capture(uint64_t seq) { points.push_back(Point{seq, list_dir(dir_fd), durable}); }
};

World* g_world = nullptr;  // the hooks are plain functions; one test at a time

std::shared_ptr<Node> wrap(NodeEnv env, Transaction* tx, std::shared_ptr<Node> file,
                           const std::string& name) {
    auto* f = dynamic_cast<FileNode*>(file.get());
    if (g_world == nullptr || f == nullptr) {
        return file;
    }
    struct stat st {};
    EXPECT_EQ(::fstat(f->fd(), &st), 0);
    auto& j = g_world->journals[st.st_ino];
    if (!j) {
        j = std::make_unique<test::Journal>();
        j->name = name;
        j->initial.resize(static_cast<size_t>(st.st_size));
        EXPECT_EQ(::pread(f->fd(), j->initial.data(), j->initial.size(), 0), st.st_size);
    }
    return test::RecorderNode::attach(env, name + " (recorder)", tx, std::move(file),
                                      &g_world->clock, j.get());
}

bool same_dir(int a, int b) {
    struct stat sa {};
    struct stat sb {};
    return ::fstat(a, &sa) == 0 && ::fstat(b, &sb) == 0 && sa.st_ino == sb.st_ino &&
           sa.st_dev == sb.st_dev;
}

void observe_sync(int dir_fd, bool done) {
    if (g_world == nullptr || !same_dir(dir_fd, g_world->dir_fd)) {
        return;
    }
    if (done) {
        g_world->durable = list_dir(dir_fd);
    } else {
        g_world->capture(g_world->clock.next());
    }
}

struct Tally {
    uint64_t points = 0;
    uint64_t second = 0;
    uint64_t recovery_points = 0;  // points in the recoveries a second crash picked from
    uint64_t crash_points = 0;
    uint64_t failures = 0;
    uint64_t qemu_checked = 0;
    uint64_t before = 0;
    uint64_t after = 0;
};

std::string materialise(const Point& p, Variant v, std::map<ino_t, test::CrashView>* views,
                        std::mt19937_64* rng, std::map<std::string, std::vector<uint8_t>>* files,
                        std::map<std::string, std::string>* links,
                        const std::map<ino_t, std::vector<uint8_t>>* unrecorded = nullptr);

class CrashJobs : public test::LoopTest {
  protected:
    void TearDown() override {
        g_world = nullptr;
        LoopTest::TearDown();
    }
    // Writes `fill` into ranges of `file` (relative to the image directory) and flushes.
    void write_layer(const test::ImageDir& dir, const std::string& file, uint8_t fill, int count);
    std::vector<uint8_t> read_export(const test::ImageDir& dir);
    // Runs `job` on NAME ("vm") with recording on; then checks every crash point.
    void run_and_check(const test::ImageDir& dir, const std::string& before_root,
                       const std::string& after_root, JobKind kind, const char* what);
    // Checks one crash state. With `rng`, the recovery (scan, open, close) is recorded and a
    // second crash at a random point of it must be survived as well.
    std::string check_state(const std::map<std::string, std::vector<uint8_t>>& files,
                            const std::map<std::string, std::string>& links,
                            const std::vector<uint8_t>& want, const std::string& before_root,
                            const std::string& after_root, bool qemu, std::mt19937_64* rng,
                            Tally* t);
    std::string second_crash(const World& recovery, const Listing& crashed,
                             const std::map<std::string, std::vector<uint8_t>>& files,
                             const std::vector<uint8_t>& want, const std::string& before_root,
                             const std::string& after_root, bool qemu, std::mt19937_64* rng,
                             Tally* t);
    Task<Status> job(ImageSet* images, JobManager* jobs, JobKind kind);
};

void CrashJobs::write_layer(const test::ImageDir& dir, const std::string& file, uint8_t fill,
                            int count) {
    auto chain = run(open_chain(env(), LocalDirStore::over(dir.fd()).get(), file, ChainOptions{}));
    ASSERT_TRUE(chain.ok()) << chain.error().message();
    use_rw(chain->top());
    std::mt19937_64 rng(fill);
    for (int i = 0; i < count; ++i) {
        uint64_t bytes = 1 + rng() % 100000;
        uint64_t off = rng() % (kGuest - bytes);
        std::vector<uint8_t> buf(bytes, static_cast<uint8_t>(fill + i));
        ASSERT_TRUE(run(chain->top()->write(off, buf)).ok());
    }
    users_.clear();
    ASSERT_TRUE(run(close_chain(&*chain)).ok());
}

std::vector<uint8_t> CrashJobs::read_export(const test::ImageDir& dir) {
    ImageSet images(env(),
                    std::make_unique<LocalDirStore>(UniqueFd(::dup(dir.fd())), dir.path().string()),
                    ImageSetOptions{});
    EXPECT_TRUE(run(images.scan()).ok());
    std::shared_ptr<Export> e = images.find("vm");
    EXPECT_NE(e, nullptr);
    std::vector<uint8_t> out;
    if (e != nullptr) {
        auto r = run(test::read_all(e->chain.top().get()));
        EXPECT_TRUE(r.ok());
        out = r.ok() ? *r : out;
    }
    (void)run(images.close_all());
    return out;
}

Task<Status> CrashJobs::job(ImageSet* images, JobManager* jobs, JobKind kind) {
    CO_TRY(co_await images->scan());
    std::shared_ptr<Export> e = images->find("vm");
    if (e == nullptr) {
        co_return make_error(ENOENT, "vm is not exported");
    }
    if (kind == JobKind::kSnapshot) {
        co_return co_await jobs->snapshot(e, "s9");
    }
    if (kind == JobKind::kStream) {
        CO_TRY(co_await jobs->start_stream(e));
    } else {
        CO_TRY(co_await jobs->start_commit(e, "vm.qcow2"));
    }
    co_await jobs->wait(e);
    co_await jobs->shutdown();
    co_return Status{};
}

std::string CrashJobs::check_state(const std::map<std::string, std::vector<uint8_t>>& files,
                                   const std::map<std::string, std::string>& links,
                                   const std::vector<uint8_t>& want, const std::string& before_root,
                                   const std::string& after_root, bool qemu, std::mt19937_64* rng,
                                   Tally* t) {
    test::ImageDir d;
    for (const auto& [name, bytes] : files) {
        test::write_file(d.file(name), bytes);
    }
    for (const auto& [name, target] : links) {
        ::link(d.file(target).c_str(), d.file(name).c_str());
    }
    for (const auto& [name, bytes] : files) {
        test::ImageCheck c = test::check_qcow2(bytes);
        if (c.corruptions != 0) {
            return name + ": " + c.first_problem;
        }
        if (qemu) {
            ++t->qemu_checked;
            test::CheckResult q = test::qemu_check(d.file(name));
            if (q.corruptions != 0 || q.check_errors != 0) {
                return name + ": qemu-img check disagrees:\n" + q.output;
            }
        }
    }
    const Listing crashed = list_dir(d.fd());
    World recovery;  // declared before the set: its recorders point into it
    ImageSetOptions o;
    if (rng != nullptr) {
        recovery.dir_fd = d.fd();
        recovery.durable = crashed;
        recovery.clock.on_issue = [&recovery](uint64_t seq) { recovery.capture(seq); };
        g_world = &recovery;
        o.wrap_file = wrap;
        o.sync_dir_observer = [fd = d.fd()](bool done) { observe_sync(fd, done); };
    }
    ImageSet images(env(),
                    std::make_unique<LocalDirStore>(UniqueFd(::dup(d.fd())), d.path().string()), o);
    std::string err;
    std::shared_ptr<Export> e;
    if (Status st = run(images.scan()); !st) {
        err = "scan: " + st.error().message();
    } else if (e = images.find("vm"); e == nullptr) {
        err = "vm is not exported:";
        for (const auto& p : images.problems()) {
            err += " " + p.reason + ";";
        }
    } else if (e->chain.layers.front().file != before_root &&
               e->chain.layers.front().file != after_root) {
        err = "vm is rooted at " + e->chain.layers.front().file;
    } else {
        ++(e->chain.layers.front().file == after_root ? t->after : t->before);
        auto got = run(test::read_all(e->chain.top().get()));
        if (!got) {
            err = "read: " + got.error().message();
        } else if (int64_t at = test::first_difference(*got, want); at >= 0) {
            err = fmt::format("guest content differs at {}", at);
        }
    }
    (void)run(images.close_all());
    if (rng == nullptr) {
        return err;
    }
    recovery.capture(recovery.clock.next());
    g_world = nullptr;
    if (!err.empty()) {
        return err;
    }
    return second_crash(recovery, crashed, files, want, before_root, after_root, qemu, rng, t);
}

// A crash at a random point of the recovery of a crash state: the directory must still open as
// before or after the job. Files the recovery did not open keep their bytes.
std::string CrashJobs::second_crash(const World& recovery, const Listing& crashed,
                                    const std::map<std::string, std::vector<uint8_t>>& files,
                                    const std::vector<uint8_t>& want,
                                    const std::string& before_root, const std::string& after_root,
                                    bool qemu, std::mt19937_64* rng, Tally* t) {
    ++t->second;
    t->recovery_points += recovery.points.size();
    std::map<ino_t, std::vector<uint8_t>> unrecorded;
    for (const auto& [name, bytes] : files) {
        unrecorded[crashed.at(name)] = bytes;
    }
    std::map<ino_t, test::CrashView> views;
    for (const auto& [ino, j] : recovery.journals) {
        views.emplace(ino, test::CrashView(j.get()));
    }
    const Point& p = recovery.points[(*rng)() % recovery.points.size()];
    for (auto& [ino, view] : views) {
        view.seek(p.seq);
    }
    const Variant v = test::kAllVariants[(*rng)() % 4];
    std::map<std::string, std::vector<uint8_t>> again;
    std::map<std::string, std::string> links;
    materialise(p, v, &views, rng, &again, &links, &unrecorded);
    Tally scratch;
    std::string err =
        check_state(again, links, want, before_root, after_root, qemu, nullptr, &scratch);
    t->qemu_checked += scratch.qemu_checked;
    return err.empty() ? err : fmt::format("second crash ({}): {}", test::variant_name(v), err);
}

// One variant of a crash point: which names survive, and each file's content.
// `unrecorded` gives the bytes of files no recorder saw (nullptr: such a variant is skipped).
std::string materialise(const Point& p, Variant v, std::map<ino_t, test::CrashView>* views,
                        std::mt19937_64* rng, std::map<std::string, std::vector<uint8_t>>* files,
                        std::map<std::string, std::string>* links,
                        const std::map<ino_t, std::vector<uint8_t>>* unrecorded) {
    std::string key;
    Listing chosen;
    std::set<std::string> names;
    for (const auto& m : {p.durable, p.listing}) {
        for (const auto& [n, ino] : m) {
            names.insert(n);
        }
    }
    for (const std::string& n : names) {
        auto old_it = p.durable.find(n);
        auto new_it = p.listing.find(n);
        bool take_new = v == Variant::kPrefix ||
                        ((v == Variant::kSubset || v == Variant::kTorn) && (*rng)() % 2 == 0);
        auto it = take_new ? new_it : old_it;
        const Listing& from = take_new ? p.listing : p.durable;
        if (it != from.end()) {
            chosen[n] = it->second;
            key += n + "=" + std::to_string(it->second) + ";";
        }
    }
    std::map<ino_t, std::string> first_name;
    for (const auto& [n, ino] : chosen) {
        if (auto f = first_name.find(ino); f != first_name.end()) {
            (*links)[n] = f->second;
            continue;
        }
        first_name[ino] = n;
        auto view = views->find(ino);
        if (view == views->end()) {
            if (unrecorded != nullptr && unrecorded->count(ino) != 0) {
                (*files)[n] = unrecorded->at(ino);
                key += n + "|";
                continue;
            }
            return "";  // a file no recorder saw (not an image): not part of the model
        }
        test::Selection sel = view->second.choose(v, rng);
        key += view->second.key(sel) + "|";
        (*files)[n] = view->second.content(sel);
    }
    return key;
}

void CrashJobs::run_and_check(const test::ImageDir& dir, const std::string& before_root,
                              const std::string& after_root, JobKind kind, const char* what) {
    const std::vector<uint8_t> want = read_export(dir);
    ASSERT_EQ(want.size(), kGuest);
    ASSERT_EQ(::fsync(dir.fd()), 0);
    auto started = std::chrono::steady_clock::now();
    World world;
    world.dir_fd = dir.fd();
    world.durable = list_dir(dir.fd());
    world.clock.on_issue = [&world](uint64_t seq) { world.capture(seq); };
    g_world = &world;
    {
        ImageSetOptions o;
        o.wrap_file = wrap;
        o.sync_dir_observer = [fd = dir.fd()](bool done) { observe_sync(fd, done); };
        ImageSet images(
            env(), std::make_unique<LocalDirStore>(UniqueFd(::dup(dir.fd())), dir.path().string()),
            o);
        JobManager jobs(&images, &log_);
        Status st = run(job(&images, &jobs, kind));
        ASSERT_TRUE(st.ok()) << st.error().message();
        world.capture(world.clock.next());  // the end, before anything is closed
        g_world = nullptr;
        (void)run(images.close_all());
    }
    ASSERT_EQ(read_export(dir), want);
    std::map<ino_t, test::CrashView> views;
    for (const auto& [ino, j] : world.journals) {
        views.emplace(ino, test::CrashView(j.get()));
    }
    // Every point, also under the sanitizers (IMGFS_CRASH_STRIDE): a job has only a few
    // dozen, and a stride could skip every point after the switch.
    Tally t;
    std::mt19937_64 rng(7);
    std::set<std::string> seen;
    for (size_t i = 0; i < world.points.size(); ++i) {
        const Point& p = world.points[i];
        for (auto& [ino, view] : views) {
            view.seek(p.seq);
        }
        ++t.crash_points;
        for (Variant v : test::kAllVariants) {
            std::map<std::string, std::vector<uint8_t>> files;
            std::map<std::string, std::string> links;
            std::string key = materialise(p, v, &views, &rng, &files, &links);
            if (!seen.insert(key).second) {
                continue;
            }
            ++t.points;
            std::string err = check_state(files, links, want, before_root, after_root,
                                          t.points % 5 == 1, &rng, &t);
            if (!err.empty() && ++t.failures <= 5) {
                ADD_FAILURE() << what << ": crash point " << i << " of " << world.points.size()
                              << ", variant " << test::variant_name(v) << ": " << err;
            }
        }
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::printf(
        "crash-harness (%s): %llu points run (4 variants at %llu crash points), %llu "
        "passed, second crash on %llu (of %llu recovery points), qemu-img check on %llu images; "
        "opened as before %llu, "
        "as after %llu; %.1f s\n",
        what, static_cast<unsigned long long>(t.points),
        static_cast<unsigned long long>(t.crash_points),
        static_cast<unsigned long long>(t.points - t.failures),
        static_cast<unsigned long long>(t.second),
        static_cast<unsigned long long>(t.recovery_points),
        static_cast<unsigned long long>(t.qemu_checked), static_cast<unsigned long long>(t.before),
        static_cast<unsigned long long>(t.after), secs);
    EXPECT_EQ(t.failures, 0U);
    if (before_root != after_root) {  // a stream keeps its root: the two cannot be told apart
        EXPECT_GT(t.before, 0U);
    }
    EXPECT_GT(t.after, 0U);
}

// A crash while a snapshot writes its new overlay leaves only the hidden file it was being
// written as (empty or partial): NAME must still be exported from its old root, and the same
// snapshot must work again. (Before the overlay was written under a hidden name, an empty
// NAME@SNAP.qcow2 left by such a crash was a second root wanting NAME: NAME vanished.)
TEST_F(CrashJobs, InterruptedOverlayCreation) {
    REQUIRE_TOOL("qemu-img");
    test::ImageDir dir;
    test::must("qemu-img create -q -f qcow2 " + dir.file("vm.qcow2") + " 1M");
    test::write_file(dir.file(".imgfs-vm@s9.qcow2.creating"), {});
    ImageSet images(env(),
                    std::make_unique<LocalDirStore>(UniqueFd(::dup(dir.fd())), dir.path().string()),
                    ImageSetOptions{});
    JobManager jobs(&images, &log_);
    ASSERT_TRUE(run(images.scan()).ok());
    std::shared_ptr<Export> e = images.find("vm");
    ASSERT_NE(e, nullptr);
    Status st = run(jobs.snapshot(e, "s9"));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(e->chain.layers.front().file, "vm@s9.qcow2");
    EXPECT_NE(::faccessat(dir.fd(), ".imgfs-vm@s9.qcow2.creating", F_OK, 0), 0);
    (void)run(jobs.shutdown());
    (void)run(images.close_all());
}

TEST_F(CrashJobs, Snapshot) {
    REQUIRE_TOOL("qemu-img");
    test::ImageDir dir;
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 " + dir.file("vm.qcow2") + " " +
               std::to_string(kGuest));
    write_layer(dir, "vm.qcow2", 0x10, 12);
    run_and_check(dir, "vm.qcow2", "vm@s9.qcow2", JobKind::kSnapshot, "snapshot");
}

// A commit across two layers: the copy into the base, then the splice that takes the middle
// layer out (hidden names), the switch, and the top's removal.
TEST_F(CrashJobs, CommitIntoADeeperBase) {
    REQUIRE_TOOL("qemu-img");
    test::ImageDir dir;
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 " + dir.file("vm.qcow2") + " " +
               std::to_string(kGuest));
    write_layer(dir, "vm.qcow2", 0x10, 6);
    test::must("cd " + dir.path().string() +
               " && qemu-img create -q -f qcow2 -o cluster_size=4096 -b vm.qcow2 -F qcow2 "
               "vm@s1.qcow2 && qemu-img create -q -f qcow2 -o cluster_size=4096 -b vm@s1.qcow2 "
               "-F qcow2 vm@s2.qcow2");
    write_layer(dir, "vm@s1.qcow2", 0x40, 5);
    write_layer(dir, "vm@s2.qcow2", 0x80, 5);
    run_and_check(dir, "vm@s2.qcow2", "vm.qcow2", JobKind::kCommit, "commit");
}

// A stream over a base it keeps (another image's name: not one of vm's own layers). vm.qcow2
// holds zeros over data of the base, which the stream does not copy (the top reads zeros there
// without a backing file). A crash part way must never leave the top on the base: the base's
// bytes would show through where vm had zeros.
TEST_F(CrashJobs, StreamOverAKeptBase) {
    REQUIRE_TOOL("qemu-img");
    test::ImageDir dir;
    test::must("qemu-img create -q -f qcow2 -o cluster_size=4096 " + dir.file("golden.qcow2") +
               " " + std::to_string(kGuest));
    test::must("qemu-io -f qcow2 -c 'write -P 0x33 0 1M' " + dir.file("golden.qcow2") +
               " >/dev/null");
    test::must("cd " + dir.path().string() +
               " && qemu-img create -q -f qcow2 -o cluster_size=4096 -b golden.qcow2 -F qcow2 "
               "vm.qcow2 && qemu-io -f qcow2 -c 'write -P 0 0 256k' -c 'write -z 512k 256k' "
               "vm.qcow2 >/dev/null && qemu-img create -q -f qcow2 -o cluster_size=4096 -b "
               "vm.qcow2 -F qcow2 vm@s1.qcow2");
    write_layer(dir, "vm.qcow2", 0x40, 4);
    write_layer(dir, "vm@s1.qcow2", 0x80, 4);
    run_and_check(dir, "vm@s1.qcow2", "vm@s1.qcow2", JobKind::kStream, "stream");
}

}  // namespace
}  // namespace imgfs
