// The life of layers and of the chain on disk, through the control files (issue 12): a layer
// that leaves a chain is closed and unlocked at once; a chain changed on disk under the mount is
// reported and stops every operation before it touches anything; what a failed or interrupted
// chain edit leaves behind is undone or removed.
#include <fcntl.h>
#include <filesystem>
#include <set>
#include <unistd.h>

#include <sys/stat.h>

#include "forwarding_store.h"
#include "fs_test_util.h"
#include "jobs/chain_edit.h"

namespace imgfs {
namespace {

constexpr uint64_t kSize = 8 << 20;

Task<void> lock_into(TimedMutex* m, TimedMutex::Guard* out) {
    *out = co_await m->lock();
}

class ChainStateTest : public test::FsTest {
  public:
    void write_fill(const std::string& name, uint64_t offset, uint64_t bytes, uint8_t fill) {
        write_raw(name, offset, std::vector<uint8_t>(bytes, fill));
    }
    void wait_job(const std::string& name) { run(jobs_->wait(images_->find(name))); }
    std::string job_error(const std::string& name) {
        std::shared_ptr<Export> e = images_->find(name);
        return e != nullptr && e->job != nullptr ? e->job->error() : "(no job)";
    }
    std::vector<std::string> hidden_files() {
        std::vector<std::string> out;
        for (const auto& ent : std::filesystem::directory_iterator(dir_.path())) {
            std::string n = ent.path().filename().string();
            if (n.rfind(".imgfs-", 0) == 0) {
                out.push_back(n);
            }
        }
        return out;
    }
    // vm: 1 MiB of 1s, snapshot s1, then `bytes` of 2s at 0. What vm.raw shows then.
    std::vector<uint8_t> snapshot_between_writes(uint64_t bytes) {
        write_fill("vm", 0, 1 << 20, 1);
        EXPECT_EQ(control(".control/vm/snapshot", "s1"), 0);
        write_fill("vm", 0, bytes, 2);
        return read_raw("vm");
    }
    // The errno of one write to NAME.raw.
    int write_errno(const std::string& name, uint64_t offset, const std::vector<uint8_t>& data) {
        const uint64_t i = ino(name + ".raw");
        const uint64_t fh = open(i, O_RDWR);
        fuse_write_in w{};
        w.fh = fh;
        w.offset = offset;
        w.size = static_cast<uint32_t>(data.size());
        test::Reply r = run(request(FUSE_WRITE, i, bytes_of(w), data));
        release(i, fh);
        return r.error;
    }
    // vm with gated files: 4 MiB of 1s, snapshot s1, then 4 MiB of 2s in the top.
    void start_gated_over_a_snapshot() {
        make_qcow2("vm.qcow2", kSize);
        ImageSetOptions options;
        gate_files(&options);
        start(options);
        write_fill("vm", 0, 4 << 20, 1);
        ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
        write_fill("vm", 0, 4 << 20, 2);
    }
    // Starts a commit of vm (gated files, snapshot s1 under the top) and holds it at its switch
    // with the image's lock, in `held`; then one guest write fails on the top after the last
    // pass, so the switch will find its range dirty and copy it again.
    void commit_ready_with_a_dirty_range(Export* e, TimedMutex::Guard* held) {
        ASSERT_EQ(control(".control/vm/commit", ""), 0);
        ASSERT_EQ(control(".control/vm/job", "speed 1"), 0);  // it crawls until the lock is held
        run(lock_into(&e->ops, held));  // the switch waits for the image's lock
        ASSERT_EQ(control(".control/vm/job", "speed 0"), 0);
        for (int i = 0; i < 5000 && e->job->state() != JobState::kReady; ++i) {
            idle(1);
        }
        ASSERT_EQ(e->job->state(), JobState::kReady) << job_error("vm");
        test::GateNode* top_gate = gate_of("vm@s1.qcow2");
        ASSERT_NE(top_gate, nullptr);
        top_gate->fail_writes = EIO;
        EXPECT_EQ(write_errno("vm", 0, std::vector<uint8_t>(4096, 9)), EIO);
        top_gate->fail_writes = 0;
    }
    // QEMU reads zeros at `range` ("OFFSET LENGTH") of the qcow2 image `path`.
    static void expect_qemu_reads_zeros(const std::string& path, const std::string& range) {
        const std::string cmd =
            "qemu-io -r -f qcow2 -c 'read -P 0 " + range + "' '" + path + "' 2>&1";
        FILE* p = ::popen(cmd.c_str(), "r");
        ASSERT_NE(p, nullptr);
        std::string out;
        char buf[256];
        while (::fgets(buf, sizeof buf, p) != nullptr) {
            out += buf;
        }
        EXPECT_EQ(::pclose(p), 0) << out;
        EXPECT_EQ(out.find("Pattern verification failed"), std::string::npos) << out;
    }
    static std::vector<std::string> files(std::initializer_list<const char*> names) {
        std::vector<std::string> v(names.begin(), names.end());
        std::sort(v.begin(), v.end());
        return v;
    }
};

TEST_F(ChainStateTest, CommitClosesTheMergedLayersAtOnce) {
    make_qcow2("vm.qcow2", kSize);
    start();
    write_fill("vm", 0, 1 << 20, 1);
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    write_fill("vm", 1 << 20, 1 << 20, 2);
    ASSERT_EQ(control(".control/vm/snapshot", "s2"), 0);
    write_fill("vm", 2 << 20, 1 << 20, 3);
    std::vector<uint8_t> content = read_raw("vm");
    EXPECT_EQ(open_files(), files({"vm.qcow2", "vm@s1.qcow2", "vm@s2.qcow2"}));
    ASSERT_EQ(control(".control/vm/commit", "base=vm.qcow2"), 0);
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(open_files(), files({"vm.qcow2"}));  // no "vm@s2.qcow2 (deleted)"
    EXPECT_EQ(read_raw("vm"), content);
}

// After a cancelled commit the job no longer holds the layers it used, so the next commit's
// merged overlay is closed when it leaves the chain.
TEST_F(ChainStateTest, CancelledCommitHoldsNothing) {
    make_qcow2("vm.qcow2", kSize);
    start();
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    for (uint64_t off = 0; off < kSize; off += 1 << 20) {
        write_fill("vm", off, 1 << 20, 5);
    }
    ASSERT_EQ(control(".control/vm/commit", "\n"), 0);
    ASSERT_EQ(control(".control/vm/job", "speed 1"), 0);
    idle(20);
    ASSERT_EQ(control(".control/vm/job", "cancel"), 0);
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "cancelled");
    ASSERT_EQ(control(".control/vm/commit", "\n"), 0);
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm.qcow2"}));
    EXPECT_EQ(open_files(), files({"vm.qcow2"}));
    EXPECT_TRUE(lockable("vm.qcow2") == false);  // the active layer is ours
}

// Stream drops the image's own history and keeps a shared-name base on disk; neither stays
// open, so another process can lock the kept base right away.
TEST_F(ChainStateTest, StreamClosesEveryLayerItDrops) {
    make_qcow2("base.qcow2", kSize);
    start();
    write_fill("base", 0, 1 << 20, 6);
    stop();
    make_qcow2("vm.qcow2", kSize, "base.qcow2");
    start();
    ASSERT_NE(images_->find("vm"), nullptr);
    write_fill("vm", 65536, 1 << 20, 7);
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    write_fill("vm", 1 << 20, 4096, 8);
    std::vector<uint8_t> content = read_raw("vm");
    EXPECT_FALSE(lockable("base.qcow2"));
    ASSERT_EQ(control(".control/vm/stream", "\n"), 0);
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm@s1.qcow2"}));
    EXPECT_EQ(open_files(), files({"vm@s1.qcow2"}));
    EXPECT_TRUE(lockable("base.qcow2"));
    EXPECT_EQ(read_raw("vm"), content);
}

TEST_F(ChainStateTest, RevertClosesTheDroppedLayer) {
    make_qcow2("vm.qcow2", kSize);
    start();
    ASSERT_EQ(control(".control/vm/snapshot", "try"), 0);
    write_fill("vm", 0, 65536, 9);
    ASSERT_EQ(control(".control/vm/revert", "\n"), 0);
    EXPECT_EQ(open_files(), files({"vm.qcow2"}));
}

TEST_F(ChainStateTest, RemovedExportClosesItsFiles) {
    make_qcow2("vm.qcow2", kSize);
    make_qcow2("other.qcow2", kSize);
    start();
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    ASSERT_EQ(::unlinkat(dir_fd_.get(), "vm@s1.qcow2", 0), 0);
    ASSERT_EQ(::renameat(dir_fd_.get(), "vm.qcow2", dir_fd_.get(), "elsewhere.img.bak"), 0);
    ASSERT_EQ(control(".control/rescan", "\n"), 0);
    EXPECT_EQ(images_->find("vm"), nullptr);
    EXPECT_EQ(open_files(), files({"other.qcow2"}));
}

// `rm img/big@s1.qcow2` (a middle layer) under a running mount: a rescan reports it (info, the
// scan's problems, the log), the image is still served from the open files, and stream, commit,
// snapshot and revert all stop before they touch anything.
TEST_F(ChainStateTest, DeletedMiddleLayerIsReportedAndStopsEveryOperation) {
    make_qcow2("big.qcow2", kSize);
    start();
    write_fill("big", 0, 1 << 20, 1);
    ASSERT_EQ(control(".control/big/snapshot", "s1"), 0);
    write_fill("big", 1 << 20, 1 << 20, 2);
    ASSERT_EQ(control(".control/big/snapshot", "g1"), 0);
    write_fill("big", 2 << 20, 1 << 20, 3);
    std::vector<uint8_t> content = read_raw("big");
    ASSERT_EQ(::unlinkat(dir_fd_.get(), "big@s1.qcow2", 0), 0);
    ASSERT_EQ(control(".control/rescan", "\n"), 0);
    std::string info = read_text(".control/big/info");
    EXPECT_NE(info.find("\"chain_mismatch\":\"big@s1.qcow2 is missing on disk\""),
              std::string::npos)
        << info;
    ASSERT_FALSE(images_->problems().empty());
    EXPECT_NE(images_->problems().front().reason.find("big@s1.qcow2 is missing"),
              std::string::npos);
    EXPECT_TRUE(log_.contains("big@s1.qcow2 is missing on disk"));
    EXPECT_EQ(read_raw("big"), content);  // still served
    std::vector<std::string> on_disk = chain_on_disk("big@g1.qcow2");
    for (const char* op : {"stream", "commit", "revert"}) {
        EXPECT_EQ(control(std::string(".control/big/") + op, "\n"), EIO) << op;
        EXPECT_NE(images_->find("big")->last_error.find("the chain on disk differs"),
                  std::string::npos)
            << op;
    }
    EXPECT_EQ(control(".control/big/snapshot", "s2"), EIO);
    EXPECT_TRUE(hidden_files().empty());
    EXPECT_EQ(chain_on_disk("big@g1.qcow2"), on_disk);  // nothing was rewritten
    EXPECT_EQ(read_raw("big"), content);
}

// A chain edit that fails before the visible names go is undone at once: the commit across two
// layers cannot give the second its hidden name (something else holds that name), so the first
// one's hidden link goes again and the chain is as it was.
TEST_F(ChainStateTest, FailedSpliceIsRolledBack) {
    make_qcow2("vm.qcow2", kSize);
    start();
    for (int i = 1; i <= 3; ++i) {
        write_fill("vm", static_cast<uint64_t>(i) << 20, 65536, static_cast<uint8_t>(i));
        ASSERT_EQ(control(".control/vm/snapshot", "s" + std::to_string(i)), 0);
    }
    std::vector<uint8_t> content = read_raw("vm");
    ASSERT_EQ(::mkdirat(dir_fd_.get(), ".imgfs-vm@s1.qcow2.removing", 0700), 0);
    ASSERT_EQ(control(".control/vm/commit", "base=vm.qcow2"), 0);
    wait_job("vm");
    EXPECT_NE(job_error("vm").find("cannot link vm@s1.qcow2"), std::string::npos)
        << job_error("vm");
    EXPECT_EQ(hidden_files(), (std::vector<std::string>{".imgfs-vm@s1.qcow2.removing"}));
    std::vector<std::string> served = chain("vm");
    EXPECT_EQ(served.size(), 4U);
    EXPECT_EQ(chain_on_disk(served.front()), served);
    EXPECT_EQ(read_raw("vm"), content);
    ASSERT_EQ(::unlinkat(dir_fd_.get(), ".imgfs-vm@s1.qcow2.removing", AT_REMOVEDIR), 0);
    ASSERT_EQ(control(".control/vm/commit", "base=vm.qcow2"), 0);
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm.qcow2"}));
    EXPECT_EQ(read_raw("vm"), content);
    EXPECT_TRUE(hidden_files().empty());
}

// A stream that drops the image's own older layers but keeps a layer below them (a base of
// another name) first cuts the lowest dropped layer off that base. When a later step fails,
// that cut is undone too: the chain on disk is the one served, as it was.
TEST_F(ChainStateTest, FailedStreamSpliceRestoresTheCutBacking) {
    make_qcow2("base.qcow2", kSize);
    make_qcow2("vm.qcow2", kSize, "base.qcow2");
    start();
    write_fill("vm", 1 << 20, 65536, 7);
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    std::vector<uint8_t> content = read_raw("vm");
    const std::vector<std::string> served = chain("vm");
    ASSERT_EQ(served, (std::vector<std::string>{"vm@s1.qcow2", "vm.qcow2", "base.qcow2"}));
    ASSERT_EQ(::mkdirat(dir_fd_.get(), ".imgfs-vm.qcow2.removing", 0700), 0);
    ASSERT_EQ(control(".control/vm/stream", "\n"), 0);
    wait_job("vm");
    EXPECT_NE(job_error("vm").find("cannot link vm.qcow2"), std::string::npos) << job_error("vm");
    EXPECT_EQ(chain("vm"), served);
    EXPECT_EQ(chain_on_disk("vm@s1.qcow2"), served);
    EXPECT_EQ(read_raw("vm"), content);
    ASSERT_EQ(::unlinkat(dir_fd_.get(), ".imgfs-vm.qcow2.removing", AT_REMOVEDIR), 0);
    ASSERT_EQ(control(".control/vm/stream", "\n"), 0);
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm@s1.qcow2"}));
    EXPECT_EQ(read_raw("vm"), content);
}

// Hidden names a chain edit left and no header uses (a failed step, a crash before the headers
// were pointed at them) go on the next scan, even though their files are still layers under
// their visible names; so does a half-written snapshot overlay.
TEST_F(ChainStateTest, RescanRemovesLeftoverHiddenNames) {
    make_qcow2("vm.qcow2", kSize);
    start();
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    ASSERT_EQ(::linkat(dir_fd_.get(), "vm.qcow2", dir_fd_.get(), ".imgfs-vm.qcow2.removing", 0), 0);
    UniqueFd half(::openat(dir_fd_.get(), ".imgfs-vm@s2.qcow2.creating",
                           O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_EQ(control(".control/rescan", "\n"), 0);
    EXPECT_TRUE(hidden_files().empty());
    EXPECT_TRUE(log_.contains("left over from an interrupted chain edit"));
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm@s1.qcow2", "vm.qcow2"}));
    EXPECT_EQ(control(".control/vm/snapshot", "s2"), 0);
}

// A crash between pointing a header at the hidden names and pointing it past them (a commit
// across vm@s1 into vm.qcow2, killed part way): the next mount finishes the edit instead of
// serving a chain through hidden names, before or after the visible name went.
TEST_F(ChainStateTest, InterruptedSpliceIsFinishedOnTheNextScan) {
    for (bool visible_gone : {false, true}) {
        SCOPED_TRACE(visible_gone ? "after the visible name went" : "before the visible name went");
        for (const auto& ent : std::filesystem::directory_iterator(dir_.path())) {
            std::filesystem::remove(ent.path());
        }
        make_qcow2("vm.qcow2", kSize);
        start();
        write_fill("vm", 3 << 20, 1 << 20, 0x5a);
        std::vector<uint8_t> content = read_raw("vm");
        stop();
        make_qcow2("vm@s1.qcow2", kSize, "vm.qcow2");
        ASSERT_EQ(
            ::linkat(dir_fd_.get(), "vm@s1.qcow2", dir_fd_.get(), ".imgfs-vm@s1.qcow2.removing", 0),
            0);
        make_qcow2("vm@s2.qcow2", kSize, ".imgfs-vm@s1.qcow2.removing");
        if (visible_gone) {
            ASSERT_EQ(::unlinkat(dir_fd_.get(), "vm@s1.qcow2", 0), 0);
        }
        start();
        EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm@s2.qcow2", "vm.qcow2"}));
        EXPECT_EQ(chain_on_disk("vm@s2.qcow2"),
                  (std::vector<std::string>{"vm@s2.qcow2", "vm.qcow2"}));
        EXPECT_TRUE(hidden_files().empty());
        EXPECT_NE(::faccessat(dir_fd_.get(), "vm@s1.qcow2", F_OK, 0), 0);
        EXPECT_TRUE(log_.contains("finished a chain edit a crash interrupted"));
        EXPECT_EQ(read_raw("vm"), content);
        stop();
    }
}

// A directory whose renames and removals of chosen names fail (EIO), as a directory on a
// failing disk does.
class RefusingStore final : public test::ForwardingStore {
  public:
    RefusingStore(std::unique_ptr<Store> inner, std::set<std::string>* refused,
                  const bool* removals_too)
        : ForwardingStore(std::move(inner)), refused_(refused), removals_too_(removals_too) {}
    Status rename_noreplace(const std::string& from, const std::string& to) override {
        if (refused_->count(from) != 0) {
            return make_error(EIO, "renaming {}: injected", from);
        }
        return inner()->rename_noreplace(from, to);
    }
    Status remove(const std::string& name) override {
        if (*removals_too_ && refused_->count(name) != 0) {
            return make_error(EIO, "removing {}: injected", name);
        }
        return inner()->remove(name);
    }
    Status sync() override {
        if (fail_sync) {
            return make_error(EIO, "syncing the directory: injected");
        }
        return inner()->sync();
    }

    bool fail_sync = false;

  private:
    std::set<std::string>* refused_;
    const bool* removals_too_;
};

// When the top leaving the chain can be neither hidden nor removed, a crash or a rescan would
// serve it over the layer below again, hiding every write that layer took since. The image is
// fenced inside the drain instead, the job fails saying why, and a rescan serves the image as
// the guest last saw it.
class UndroppableTopTest : public ChainStateTest {
  protected:
    void SetUp() override {
        ChainStateTest::SetUp();
        wrap_store_ = [this](std::unique_ptr<Store> inner) -> std::unique_ptr<Store> {
            auto store =
                std::make_unique<RefusingStore>(std::move(inner), &refused_, &removals_too_);
            store_ = store.get();
            return store;
        };
    }
    std::set<std::string> refused_;
    bool removals_too_ = true;
    RefusingStore* store_ = nullptr;  // owned by the image set
};

TEST_F(UndroppableTopTest, ACommitWhoseTopStaysFencesTheImage) {
    make_qcow2("vm.qcow2", kSize);
    start();
    std::vector<uint8_t> content = snapshot_between_writes(65536);
    refused_ = {"vm@s1.qcow2"};
    ASSERT_EQ(control(".control/vm/commit", ""), 0);
    wait_job("vm");
    EXPECT_NE(job_error("vm").find("could be neither hidden"), std::string::npos)
        << job_error("vm");
    EXPECT_EQ(write_errno("vm", 0, std::vector<uint8_t>(4096, 9)), EIO)
        << "a write reached the base while the top can come back over it";
    refused_.clear();
    ASSERT_EQ(control(".control/rescan", ""), 0);
    EXPECT_EQ(read_raw("vm"), content);
}

// A middle layer whose visible name cannot be removed: the commit that takes it out fails past
// its point of no return (the headers already name the hidden name). The image served the old
// names, which no longer matched the disk, so every later operation failed with EIO until a
// remount. The served chain takes the hidden names: the image goes on working, and the next
// mount finishes the edit.
TEST_F(UndroppableTopTest, AMiddleLayerThatCannotBeRemovedLeavesTheImageWorking) {
    make_qcow2("vm.qcow2", kSize);
    start();
    write_fill("vm", 0, 1 << 20, 1);
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    write_fill("vm", 1 << 20, 1 << 20, 2);
    ASSERT_EQ(control(".control/vm/snapshot", "s2"), 0);
    write_fill("vm", 2 << 20, 1 << 20, 3);
    refused_ = {"vm@s1.qcow2"};
    ASSERT_EQ(control(".control/vm/commit", "base=vm.qcow2"), 0);
    wait_job("vm");
    EXPECT_NE(job_error("vm"), "");
    std::vector<std::string> served = chain("vm");
    ASSERT_EQ(served.size(), 3U);
    EXPECT_EQ(chain_on_disk(served.front()), served);
    EXPECT_EQ(write_errno("vm", 3 << 20, std::vector<uint8_t>(4096, 4)), 0);
    EXPECT_EQ(control(".control/vm/snapshot", "s3"), 0) << images_->find("vm")->last_error;
    std::vector<uint8_t> content = read_raw("vm");
    // No other edit until the next mount finishes this one: a commit could make the hidden
    // layer the active one, which a scan then deleted as a leftover.
    EXPECT_EQ(control(".control/vm/commit", ""), EBUSY);
    EXPECT_EQ(control(".control/vm/stream", ""), EBUSY);
    EXPECT_NE(images_->find("vm")->last_error.find("did not finish"), std::string::npos)
        << images_->find("vm")->last_error;
    // Nor a revert: dropping a top removes whatever has the top's hidden name first.
    EXPECT_EQ(control(".control/vm/revert", ""), EBUSY);
    EXPECT_NE(images_->find("vm")->last_error.find("did not finish"), std::string::npos)
        << images_->find("vm")->last_error;
    ASSERT_EQ(control(".control/rescan", ""), 0);
    EXPECT_TRUE(images_->problems().empty()) << images_->problems().front().reason;
    served = chain("vm");
    EXPECT_EQ(chain_on_disk(served.front()), served);
    EXPECT_EQ(read_raw("vm"), content);
    refused_.clear();
    stop();
    start();
    EXPECT_EQ(read_raw("vm"), content);
    served = chain("vm");
    EXPECT_EQ(chain_on_disk(served.front()), served);
    EXPECT_TRUE(hidden_files().empty());
}

// The same failure in a stream that keeps a base of another name below: the lowest dropped
// layer was cut off that base first (step 0). The cut stays, so the next mount makes the top
// stand alone, as the stream meant; undone, the base's data would show where the dropped layer
// read zeros. Until then the image's I/O works.
TEST_F(UndroppableTopTest, AStreamFailingPastItsPointOfNoReturnKeepsItsCut) {
    REQUIRE_TOOL("qemu-io");
    make_qcow2("base.qcow2", kSize);
    make_qcow2("vm.qcow2", kSize, "base.qcow2");
    // The base has data where vm has zero clusters: the stream copies nothing there.
    const std::string base_data =
        "qemu-io -f qcow2 -c 'write -P 5 0 1M' '" + dir_.file("base.qcow2") + "' >/dev/null";
    const std::string vm_zeros =
        "qemu-io -f qcow2 -c 'write -z 0 1M' '" + dir_.file("vm.qcow2") + "' >/dev/null";
    ASSERT_EQ(std::system(base_data.c_str()), 0);
    ASSERT_EQ(std::system(vm_zeros.c_str()), 0);
    start();
    write_fill("vm", 1 << 20, 65536, 7);
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    std::vector<uint8_t> content = read_raw("vm");
    refused_ = {"vm.qcow2"};
    ASSERT_EQ(control(".control/vm/stream", "\n"), 0);
    wait_job("vm");
    EXPECT_NE(job_error("vm"), "");
    EXPECT_EQ(write_errno("vm", 2 << 20, std::vector<uint8_t>(4096, 4)), 0);
    content = read_raw("vm");
    refused_.clear();
    stop();
    start();
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm@s1.qcow2"}));
    EXPECT_EQ(read_raw("vm"), content);
    EXPECT_TRUE(hidden_files().empty());
}

TEST_F(UndroppableTopTest, ARevertWhoseTopStaysFencesTheImage) {
    make_qcow2("vm.qcow2", kSize);
    start();
    std::vector<uint8_t> content = snapshot_between_writes(65536);
    refused_ = {"vm@s1.qcow2"};
    EXPECT_EQ(control(".control/vm/revert", ""), EIO);
    EXPECT_EQ(write_errno("vm", 0, std::vector<uint8_t>(4096, 9)), EIO)
        << "a write reached the layer below while the top can come back";
    refused_.clear();
    ASSERT_EQ(control(".control/rescan", ""), 0);
    EXPECT_EQ(read_raw("vm"), content) << "the rescan did not serve the image as it was";
}

// The rename to the hidden name works but the directory sync after it fails: the rename may
// not survive a crash, and removing the visible name cannot help any more. Fenced as well.
TEST_F(UndroppableTopTest, ACommitWhoseHideIsNotDurableFencesTheImage) {
    make_qcow2("vm.qcow2", kSize);
    start();
    std::vector<uint8_t> content = snapshot_between_writes(65536);
    ASSERT_NE(store_, nullptr);
    store_->fail_sync = true;
    ASSERT_EQ(control(".control/vm/commit", ""), 0);
    wait_job("vm");
    store_->fail_sync = false;
    EXPECT_NE(job_error("vm").find("could not be synced"), std::string::npos) << job_error("vm");
    EXPECT_EQ(write_errno("vm", 0, std::vector<uint8_t>(4096, 9)), EIO);
    ASSERT_EQ(control(".control/rescan", ""), 0);
    EXPECT_EQ(read_raw("vm"), content);
}

// Hiding fails but removing works: the top is removed inside the drain, and the commit ends
// as usual.
TEST_F(UndroppableTopTest, ACommitWhoseTopCannotBeHiddenRemovesIt) {
    make_qcow2("vm.qcow2", kSize);
    start();
    std::vector<uint8_t> content = snapshot_between_writes(65536);
    refused_ = {"vm@s1.qcow2"};
    removals_too_ = false;
    ASSERT_EQ(control(".control/vm/commit", ""), 0);
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_FALSE(std::filesystem::exists(dir_.path() / "vm@s1.qcow2"));
    EXPECT_TRUE(hidden_files().empty());
    EXPECT_EQ(write_errno("vm", 1 << 20, std::vector<uint8_t>(4096, 9)), 0);
    content[1 << 20] = 9;
    EXPECT_EQ(read_raw("vm")[1 << 20], 9);
    EXPECT_EQ(read_raw("vm")[0], content[0]);
}

// A pool refuses to remove an image its client still has open (it holds the image's watch and
// lock); a directory does not. This store refuses removals as a pool does, and the renames of
// the names in `refused` as a failing directory would.
class PoolLikeStore final : public test::ForwardingStore {
  public:
    PoolLikeStore(std::unique_ptr<Store> inner, std::string dir, std::set<std::string>* refused)
        : ForwardingStore(std::move(inner)), dir_(std::move(dir)), refused_(refused) {}
    Status rename_noreplace(const std::string& from, const std::string& to) override {
        if (refused_->count(from) != 0) {
            return make_error(EIO, "renaming {}: injected", from);
        }
        return inner()->rename_noreplace(from, to);
    }
    Status remove(const std::string& name) override {
        if (open_here(dir_ + "/" + name)) {
            return make_error(EBUSY, "{} is still open", name);
        }
        return inner()->remove(name);
    }

  private:
    // Whether this process has a descriptor of the file at `path`.
    static bool open_here(const std::string& path) {
        struct stat target {};
        if (::stat(path.c_str(), &target) != 0) {
            return false;
        }
        for (const auto& fd : std::filesystem::directory_iterator("/proc/self/fd")) {
            struct stat st {};
            if (::stat(fd.path().c_str(), &st) == 0 && st.st_dev == target.st_dev &&
                st.st_ino == target.st_ino) {
                return true;
            }
        }
        return false;
    }

    std::string dir_;
    std::set<std::string>* refused_;
};

class PoolLikeStoreTest : public ChainStateTest {
  protected:
    void SetUp() override {
        ChainStateTest::SetUp();
        wrap_store_ = [this](std::unique_ptr<Store> inner) -> std::unique_ptr<Store> {
            return std::make_unique<PoolLikeStore>(std::move(inner), dir_.path(), &refused_);
        };
    }
    std::set<std::string> refused_;
};

// A snapshot whose new overlay cannot be renamed into place removes it again. It used to try
// while still holding the overlay open, which a pool refuses: the .creating image stayed
// behind until a later scan.
TEST_F(PoolLikeStoreTest, AFailedSnapshotLeavesNoOverlayBehind) {
    make_qcow2("vm.qcow2", kSize);
    start();
    write_fill("vm", 0, 65536, 1);
    std::vector<uint8_t> content = read_raw("vm");
    refused_ = {creating_name("vm@s1.qcow2")};
    EXPECT_EQ(control(".control/vm/snapshot", "s1"), EIO);
    EXPECT_TRUE(hidden_files().empty()) << testing::PrintToString(hidden_files());
    EXPECT_EQ(chain("vm"), std::vector<std::string>{"vm.qcow2"});
    EXPECT_EQ(read_raw("vm"), content);
    refused_.clear();
    EXPECT_EQ(control(".control/vm/snapshot", "s1"), 0) << images_->find("vm")->last_error;
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm@s1.qcow2", "vm.qcow2"}));
}

// Growing an image whose backing file is longer: the new range reads as zeros, as it did
// before the grow (past the image's end), not as the backing file's bytes.
TEST_F(ChainStateTest, AGrownImageDoesNotShowItsLongerBackingFile) {
    REQUIRE_TOOL("qemu-io");
    make_qcow2("golden.qcow2", kSize);
    start();
    write_fill("golden", 0, kSize, 0x33);
    stop();
    make_qcow2("vm.qcow2", kSize / 2, "golden.qcow2");
    start();
    test::Reply r = run(setattr_size_task(ino("vm.raw"), kSize));
    ASSERT_EQ(r.error, 0);
    std::vector<uint8_t> raw = read_raw("vm");
    ASSERT_EQ(raw.size(), kSize);
    EXPECT_EQ(raw[kSize / 2 - 1], 0x33);
    EXPECT_EQ(raw[kSize / 2], 0) << "the backing file shows through the grown range";
    EXPECT_EQ(raw[kSize - 1], 0);
    stop();
    expect_qemu_reads_zeros((dir_.path() / "vm.qcow2").string(), "4M 4M");
}

// A commit grows a base shorter than the image and zeroes the new range, so a longer backing
// file below does not show through. The new size is durable at once, so the zeroes must be
// too: a crash during the copy (here: a copy of the files taken while the job is held at a
// crawl) must not show the backing file's bytes where the guest read zeros.
TEST_F(ChainStateTest, AGrownBaseReadsAsZerosOnDiskWhileTheCommitRuns) {
    REQUIRE_TOOL("qemu-io");
    make_qcow2("golden.qcow2", kSize);
    start();
    write_fill("golden", 0, kSize, 0x33);
    stop();
    make_qcow2("vm.qcow2", kSize / 2, "golden.qcow2");
    start();
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    test::Reply r = run(setattr_size_task(ino("vm.raw"), kSize));
    ASSERT_EQ(r.error, 0);
    write_fill("vm", 0, 1 << 20, 7);
    ASSERT_EQ(read_raw("vm")[kSize - 1], 0);
    ASSERT_EQ(control(".control/vm/commit", ""), 0);
    ASSERT_EQ(control(".control/vm/job", "speed 1"), 0);
    idle(100);
    test::TempDir copy;
    for (const char* f : {"golden.qcow2", "vm.qcow2", "vm@s1.qcow2"}) {
        std::filesystem::copy_file(dir_.path() / f, copy.path() / f);
    }
    ASSERT_EQ(control(".control/vm/job", "cancel"), 0);
    wait_job("vm");
    expect_qemu_reads_zeros((copy.path() / "vm@s1.qcow2").string(), "6M 64k");
}

// A guest write that fails on the top after the commit's last pass leaves its range dirty
// (the top may hold part of it), which the switch then finds. The range is copied again and
// the switch tried again: one failed guest write does not throw the commit away.
TEST_F(ChainStateTest, AWriteFailingJustBeforeTheSwitchDoesNotAbandonTheCommit) {
    ASSERT_NO_FATAL_FAILURE(start_gated_over_a_snapshot());
    std::vector<uint8_t> content = read_raw("vm");
    std::shared_ptr<Export> e = images_->find("vm");
    TimedMutex::Guard held;
    ASSERT_NO_FATAL_FAILURE(commit_ready_with_a_dirty_range(e.get(), &held));
    held = TimedMutex::Guard();
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm.qcow2"}));
    EXPECT_EQ(read_raw("vm"), content);
}

// A commit that is completing cannot be cancelled. When its switch finds a range dirty (a guest
// write failed after the last pass) it copies the range again, at the job's rate limit: an
// unmount then waited for that copy at 1 byte/s. Shutdown lifts the limit instead.
TEST_F(ChainStateTest, UnmountDoesNotWaitForARateLimitedCopyOfACompletingJob) {
    ASSERT_NO_FATAL_FAILURE(start_gated_over_a_snapshot());
    std::shared_ptr<Export> e = images_->find("vm");
    TimedMutex::Guard held;
    ASSERT_NO_FATAL_FAILURE(commit_ready_with_a_dirty_range(e.get(), &held));
    ASSERT_EQ(control(".control/vm/job", "speed 1"), 0);
    held = TimedMutex::Guard();
    idle(50);  // the switch found the range dirty and copies it again, at a crawl
    e.reset();
    const auto t0 = std::chrono::steady_clock::now();
    stop();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
    gates_.clear();  // they hold the files open
    start();
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm.qcow2"}))
        << (images_->problems().empty() ? "" : images_->problems().front().reason);
}

// The same copy again, without an unmount: it runs under the image's lock, so at the job's rate
// limit it held every snapshot, revert and rescan of the image (10 s, then EBUSY) for as long
// as the copy took. Under the lock, a completing commit copies at full speed.
TEST_F(ChainStateTest, ACompletingCommitDoesNotHoldTheImageAtItsRateLimit) {
    ASSERT_NO_FATAL_FAILURE(start_gated_over_a_snapshot());
    std::shared_ptr<Export> e = images_->find("vm");
    TimedMutex::Guard held;
    ASSERT_NO_FATAL_FAILURE(commit_ready_with_a_dirty_range(e.get(), &held));
    ASSERT_EQ(control(".control/vm/job", "speed 1"), 0);
    held = TimedMutex::Guard();
    // And a limit set again once the switch has lifted it has no effect either.
    ASSERT_EQ(control(".control/vm/job", "speed 1"), 0);
    const auto t0 = std::chrono::steady_clock::now();
    wait_job("vm");
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(chain("vm"), (std::vector<std::string>{"vm.qcow2"}));
    e.reset();
}

// A stream that finishes deletes the image's own older layers once it found no other user. A
// clone made on one of them after that check, and exported by a rescan, lost its backing file
// under its export. The layers are marked as changing from the check on: the rescan does not
// export the clone, and says why.
TEST_F(ChainStateTest, ARescanDoesNotServeACloneOfALayerAFinishingStreamDeletes) {
    make_qcow2("vm.qcow2", kSize);
    ImageSetOptions options;
    gate_files(&options);
    options.op_wait = std::chrono::milliseconds(100);
    start(options);
    write_fill("vm", 0, 1 << 20, 1);
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    write_fill("vm", 1 << 20, 1 << 20, 2);
    std::vector<uint8_t> content = read_raw("vm");
    std::shared_ptr<Export> e = images_->find("vm");
    ASSERT_EQ(control(".control/vm/stream", ""), 0);
    ASSERT_EQ(control(".control/vm/job", "speed 1"), 0);  // it crawls until the lock is held
    TimedMutex::Guard held;
    run(lock_into(&e->ops, &held));  // the stream's finish waits for the image's lock
    ASSERT_EQ(control(".control/vm/job", "speed 0"), 0);
    for (int i = 0; i < 5000 && e->job->state() != JobState::kReady; ++i) {
        idle(1);
    }
    ASSERT_EQ(e->job->state(), JobState::kReady) << job_error("vm");
    test::GateNode* top_gate = gate_of("vm@s1.qcow2");
    ASSERT_NE(top_gate, nullptr);
    top_gate->hold();  // the finish stops at its flush of the top, after the users' check
    held = TimedMutex::Guard();
    for (int i = 0; i < 5000 && top_gate->waiting() == 0; ++i) {
        idle(1);
    }
    ASSERT_GT(top_gate->waiting(), 0);
    make_qcow2("clone.qcow2", kSize, "vm.qcow2");
    ASSERT_EQ(control(".control/rescan", ""), 0);
    EXPECT_EQ(images_->find("clone"), nullptr) << "a clone of a layer being deleted is served";
    bool said = false;
    for (const ScanProblem& p : images_->problems()) {
        said =
            said || p.reason.find("not exported while the stream of vm runs") != std::string::npos;
    }
    EXPECT_TRUE(said);
    top_gate->release();
    e.reset();
    wait_job("vm");
    EXPECT_EQ(job_error("vm"), "");
    EXPECT_EQ(read_raw("vm"), content);
}

// The hide of the dropped top must be durable before guest writes reach the layer that takes
// its place: a crash in between brings the top back over writes the guest may have fsynced.
// The observer runs as the directory sync of each chain edit starts; at the hide, the image's
// root is already the new layer, and the backend must still be drained.
class PivotDrainTest : public ChainStateTest {
  protected:
    // Records whether the backend was quiesced when a hide's directory sync began with `root`
    // as the image's root node.
    ImageSetOptions observe_hide(const std::string& root) {
        ImageSetOptions o;
        o.sync_dir_observer = [this, root](bool done) {
            std::shared_ptr<Export> e = images_ != nullptr ? images_->find("vm") : nullptr;
            if (!armed_ || done || e == nullptr || e->backend->root_node() == nullptr ||
                e->backend->root_node()->name() != root || hidden_files().empty()) {
                return;  // not the hide's sync (the removal's comes later, undrained)
            }
            ++hides_seen_;
            quiesced_at_every_hide_ = quiesced_at_every_hide_ && e->backend->quiesced();
        };
        return o;
    }
    // Commits vm (with `args`) while the observer watches, and checks the result.
    void commit_watching_the_hide(const std::string& args, const std::vector<uint8_t>& content) {
        armed_ = true;
        ASSERT_EQ(control(".control/vm/commit", args), 0);
        wait_job("vm");
        armed_ = false;
        EXPECT_EQ(job_error("vm"), "");
        expect_drained_at_every_hide();
        EXPECT_EQ(read_raw("vm"), content);
    }
    void expect_drained_at_every_hide() const {
        EXPECT_GT(hides_seen_, 0) << "the top was never hidden";
        EXPECT_TRUE(quiesced_at_every_hide_) << "guest writes reached the layer below first";
    }
    bool armed_ = false;
    int hides_seen_ = 0;
    bool quiesced_at_every_hide_ = true;
};

TEST_F(PivotDrainTest, CommitKeepsGuestWritesOutUntilTheTopIsHidden) {
    make_qcow2("vm.qcow2", kSize);
    start(observe_hide("vm.qcow2"));
    std::vector<uint8_t> content = snapshot_between_writes(1 << 20);
    commit_watching_the_hide("", content);
}

TEST_F(PivotDrainTest, CommitOfAMiddleLayerKeepsGuestWritesOut) {
    make_qcow2("vm.qcow2", kSize);
    start(observe_hide("vm.qcow2"));
    write_fill("vm", 0, 1 << 20, 1);
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    write_fill("vm", 1 << 20, 1 << 20, 2);
    ASSERT_EQ(control(".control/vm/snapshot", "s2"), 0);
    write_fill("vm", 2 << 20, 1 << 20, 3);
    std::vector<uint8_t> content = read_raw("vm");
    commit_watching_the_hide("base=vm.qcow2", content);
}

TEST_F(PivotDrainTest, RevertKeepsGuestWritesOutUntilTheTopIsHidden) {
    make_qcow2("vm.qcow2", kSize);
    start(observe_hide("vm.qcow2"));
    write_fill("vm", 0, 1 << 20, 1);
    std::vector<uint8_t> content = read_raw("vm");
    ASSERT_EQ(control(".control/vm/snapshot", "s1"), 0);
    write_fill("vm", 0, 1 << 20, 2);
    armed_ = true;
    ASSERT_EQ(control(".control/vm/revert", ""), 0);
    armed_ = false;
    expect_drained_at_every_hide();
    EXPECT_EQ(read_raw("vm"), content);
}

}  // namespace
}  // namespace imgfs
