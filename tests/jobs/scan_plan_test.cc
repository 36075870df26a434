// unserved_users: the images a mount does not serve whose chains reach a layer a commit would
// change. A user it cannot read must make it fail, never pass as "no user". And plan_scan's
// removal of leftovers, which must not remove what an unreadable header may use.
#include "jobs/scan_plan.h"

#include <algorithm>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <unistd.h>
#include <vector>

#include <gtest/gtest.h>

#include "drivers/local_store.h"
#include "drivers/qcow2/create.h"
#include "forwarding_store.h"
#include "test_util.h"

namespace imgfs {
namespace {

// A directory store whose open() fails with a given errno for chosen names, as a pool does when
// the cluster does not answer for one image.
class FailingOpenStore final : public test::ForwardingStore {
  public:
    using ForwardingStore::ForwardingStore;
    std::map<std::string, int> fail_open;  // name -> errno
    std::map<std::string, int> opens;      // name -> how often open() was called
    bool one_name_only = false;            // as a pool: no hard links, edits rename
    int open_elsewhere_errno = 0;          // open_elsewhere() fails with it (0: "no")
    int rename_errno = 0;                  // rename_noreplace() fails with it

    [[nodiscard]] const StoreCaps& caps() const override {
        if (!one_name_only) {
            return inner()->caps();
        }
        pool_caps_ = inner()->caps();
        pool_caps_.second_names = false;
        return pool_caps_;
    }
    Result<bool> open_elsewhere(const std::string& name) override {
        if (open_elsewhere_errno != 0) {
            return make_error(open_elsewhere_errno, "{}: injected", name);
        }
        return false;
    }
    Status rename_noreplace(const std::string& from, const std::string& to) override {
        if (rename_errno != 0) {
            return make_error(rename_errno, "cannot rename {} to {}: injected", from, to);
        }
        return inner()->rename_noreplace(from, to);
    }
    Result<std::unique_ptr<StoreFile>> open(const std::string& name, bool read_only,
                                            bool direct) override {
        ++opens[name];
        if (auto it = fail_open.find(name); it != fail_open.end()) {
            return make_error(it->second, "{}: injected", name);
        }
        return inner()->open(name, read_only, direct);
    }

  private:
    mutable StoreCaps pool_caps_;
};

class UnservedUsersTest : public ::testing::Test {
  protected:
    void SetUp() override {
        put("base.qcow2", "");
        put("vm1.qcow2", "base.qcow2");
        put("vm2.qcow2", "base.qcow2");
        put("other.qcow2", "");
        int fd = ::open(dir_.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        ASSERT_GE(fd, 0);
        store_ = std::make_unique<FailingOpenStore>(LocalDirStore::over(fd));
        ::close(fd);
        Result<FileId> base = store_->id_of("base.qcow2", false);
        ASSERT_TRUE(base.ok());
        base_ = *base;
    }

    /// A scan that may remove leftovers while one export serves `chain` (top first).
    ScanPlan scan_serving(const std::vector<std::string>& chain) {
        ScanInput in;
        in.store = store_.get();
        in.remove_leftovers = true;
        for (const std::string& file : chain) {
            Result<FileId> id = store_->id_of(file, false);
            EXPECT_TRUE(id.ok()) << file;
            in.served[1].push_back(ServedLayer{file, id.ok() ? *id : FileId{}});
        }
        return plan_scan(in);
    }

    void put(const std::string& name, const std::string& backing) {
        qcow2::CreateOptions o;
        o.size = 1 << 20;
        o.backing_file = backing;
        Result<std::vector<uint8_t>> img = qcow2::build_new_image(o);
        ASSERT_TRUE(img.ok()) << img.error().message();
        std::ofstream f(dir_.file(name), std::ios::binary | std::ios::trunc);
        f.write(reinterpret_cast<const char*>(img->data()),
                static_cast<std::streamsize>(img->size()));
        ASSERT_TRUE(f.good());
    }

    // As a crash in a pool's chain edit leaves it: old.qcow2, which vm3.qcow2's header names,
    // exists only under its hidden name.
    void hide_a_used_layer() {
        put("old.qcow2", "");
        put("vm3.qcow2", "old.qcow2");
        ASSERT_EQ(::rename(dir_.file("old.qcow2").c_str(),
                           dir_.file(".imgfs-old.qcow2.removing").c_str()),
                  0);
        store_->one_name_only = true;
    }

    // Users of the base other than vm1 (the served chain).
    Result<std::vector<UnservedUser>> users() {
        return unserved_users(store_.get(), false, {base_}, {"vm1.qcow2", "base.qcow2"});
    }

    test::TempDir dir_;
    std::unique_ptr<FailingOpenStore> store_;
    FileId base_{};
};

TEST_F(UnservedUsersTest, FindsTheChainThisMountDoesNotServe) {
    Result<std::vector<UnservedUser>> found = users();
    ASSERT_TRUE(found.ok()) << found.error().message();
    ASSERT_EQ(found->size(), 1U);
    EXPECT_EQ((*found)[0].image, "vm2.qcow2");
    EXPECT_EQ((*found)[0].layer, base_);
}

// vm2's header carries a feature imgfs does not know (QEMU of a later version may use it):
// imgfs cannot open it, but its header still names the base it uses. The walk stopped at the
// header error, so vm2 was "no user": a commit of vm1 changed what vm2 shows, and with vm1
// gone the base was exported as an image of its own, writable.
TEST_F(UnservedUsersTest, AnImageWhoseHeaderImgfsCannotUseStillUsesItsBase) {
    const std::string vm2 = dir_.file("vm2.qcow2");
    std::fstream f(vm2, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(72 + 2);  // incompatible_features, a bit of its third byte (bit 40)
    f.put(1);
    f.close();
    Result<std::vector<UnservedUser>> found = users();
    ASSERT_TRUE(found.ok()) << found.error().message();
    ASSERT_EQ(found->size(), 1U);
    EXPECT_EQ((*found)[0].image, "vm2.qcow2");
    ASSERT_EQ(::unlink(dir_.file("vm1.qcow2").c_str()), 0);
    ScanInput in;
    in.store = store_.get();
    ScanPlan plan = plan_scan(in);
    ASSERT_FALSE(plan.failed);
    EXPECT_EQ(plan.wanted.count("base"), 0U) << "vm2's base was exported on its own";
    EXPECT_EQ(plan.wanted.count("vm2"), 0U);
    bool reported = false;
    for (const ScanProblem& p : plan.problems) {
        reported = reported || p.file == "vm2.qcow2";
    }
    EXPECT_TRUE(reported);
}

// A cluster that does not answer for vm2 must not turn it into "not a user".
TEST_F(UnservedUsersTest, AnImageThatCannotBeReadFailsTheSearch) {
    store_->fail_open["vm2.qcow2"] = EIO;
    Result<std::vector<UnservedUser>> found = users();
    ASSERT_FALSE(found.ok());
    EXPECT_EQ(found.error().errnum, EIO);
    EXPECT_NE(found.error().message().find("vm2.qcow2"), std::string::npos)
        << found.error().message();
}

// Images that share their lower layers: each shared layer is read once per search, and every
// image above it is still found.
TEST_F(UnservedUsersTest, ASharedLayerIsReadOncePerSearch) {
    put("mid.qcow2", "base.qcow2");
    for (const char* vm : {"a.qcow2", "b.qcow2", "c.qcow2"}) {
        put(vm, "mid.qcow2");
    }
    Result<std::vector<UnservedUser>> found = users();
    ASSERT_TRUE(found.ok()) << found.error().message();
    std::vector<std::string> images;
    for (const UnservedUser& u : *found) {
        EXPECT_EQ(u.layer, base_);
        images.push_back(u.image);
    }
    std::sort(images.begin(), images.end());
    EXPECT_EQ(images, (std::vector<std::string>{"a.qcow2", "b.qcow2", "c.qcow2", "mid.qcow2",
                                                "vm2.qcow2"}));
    EXPECT_EQ(store_->opens["mid.qcow2"], 1);
    EXPECT_EQ(store_->opens["base.qcow2"], 1);
}

// One that went since the listing, or that the store refuses to every mount, is no user.
TEST_F(UnservedUsersTest, AnImageThatIsGoneOrRefusedIsNoUser) {
    for (int errnum : {ENOENT, EPERM}) {
        store_->fail_open["vm2.qcow2"] = errnum;
        Result<std::vector<UnservedUser>> found = users();
        ASSERT_TRUE(found.ok()) << found.error().message();
        EXPECT_TRUE(found->empty());
    }
}

// A hidden name (what an interrupted chain edit leaves) that only vm3's header uses. When vm3
// cannot be read, the scan cannot know that, so it keeps the name and says why.
TEST_F(UnservedUsersTest, ScanRefusesExportNamesTheMountCannotShow) {
    put("@nameless.qcow2", "");  // a snapshot overlay's name with nothing before the '@'
    put("jobs.qcow2", "");       // .control/jobs is the mount's own file
    ScanInput in;
    in.store = store_.get();
    ScanPlan plan = plan_scan(in);
    ASSERT_FALSE(plan.failed);
    EXPECT_EQ(plan.wanted.count(""), 0U);
    EXPECT_EQ(plan.wanted.count("jobs"), 0U);
    EXPECT_EQ(plan.wanted.count("vm1"), 1U);  // the others are served as before
    std::map<std::string, std::string> why;
    for (const ScanProblem& p : plan.problems) {
        why[p.file] = p.reason;
    }
    EXPECT_NE(why["@nameless.qcow2"].find("its export name is empty"), std::string::npos);
    EXPECT_NE(why["jobs.qcow2"].find("taken by the mount's own .control/jobs"), std::string::npos);
}

TEST_F(UnservedUsersTest, ScanKeepsHiddenNamesWhileAHeaderCannotBeRead) {
    put(".imgfs-old.qcow2.removing", "");
    put("vm3.qcow2", ".imgfs-old.qcow2.removing");
    ScanInput in;
    in.store = store_.get();
    in.remove_leftovers = true;

    store_->fail_open["vm3.qcow2"] = EIO;
    ScanPlan kept = plan_scan(in);
    ASSERT_FALSE(kept.failed);
    EXPECT_TRUE(kept.removed.empty());
    EXPECT_TRUE(std::filesystem::exists(dir_.file(".imgfs-old.qcow2.removing")));
    bool said = false;
    for (const ScanProblem& p : kept.problems) {
        said = said || (p.file == ".imgfs-old.qcow2.removing" &&
                        p.reason.find("vm3.qcow2 could not be read") != std::string::npos);
    }
    EXPECT_TRUE(said);

    // Readable again: vm3 uses the name, so it stays, and nothing is reported about it.
    store_->fail_open.clear();
    ScanPlan again = plan_scan(in);
    EXPECT_TRUE(again.removed.empty());
    EXPECT_TRUE(std::filesystem::exists(dir_.file(".imgfs-old.qcow2.removing")));

    // Once no header uses it, a scan removes it.
    ASSERT_EQ(::unlink(dir_.file("vm3.qcow2").c_str()), 0);
    ScanPlan removed = plan_scan(in);
    ASSERT_EQ(removed.removed.size(), 1U);
    EXPECT_FALSE(std::filesystem::exists(dir_.file(".imgfs-old.qcow2.removing")));
}

// In a store whose edits rename (a pool), a crash can leave a header naming a layer that now
// exists only under its hidden name. While the scan cannot tell whether another host's edit is
// under way (open_elsewhere fails), it neither renames it back nor deletes it.
TEST_F(UnservedUsersTest, ScanKeepsAHiddenLayerItDeclinedToRenameBack) {
    ASSERT_NO_FATAL_FAILURE(hide_a_used_layer());
    store_->open_elsewhere_errno = ETIMEDOUT;
    ScanInput in;
    in.store = store_.get();
    in.remove_leftovers = true;
    ScanPlan declined = plan_scan(in);
    EXPECT_TRUE(declined.removed.empty());
    EXPECT_TRUE(std::filesystem::exists(dir_.file(".imgfs-old.qcow2.removing")));

    // Once it can be checked, the scan renames it back.
    store_->open_elsewhere_errno = 0;
    ScanPlan restored = plan_scan(in);
    EXPECT_TRUE(std::filesystem::exists(dir_.file("old.qcow2")));
    EXPECT_FALSE(std::filesystem::exists(dir_.file(".imgfs-old.qcow2.removing")));
}

// A rename back that fails (in a pool: the cluster past its deadline, or a name a half-done
// rename left claimed) is said in the plan's problems, and the next scan tries again.
TEST_F(UnservedUsersTest, ScanSaysWhyAHiddenLayerCouldNotBeRenamedBack) {
    ASSERT_NO_FATAL_FAILURE(hide_a_used_layer());
    store_->rename_errno = EEXIST;
    ScanInput in;
    in.store = store_.get();
    in.remove_leftovers = true;
    ScanPlan failed = plan_scan(in);
    EXPECT_TRUE(failed.removed.empty());
    EXPECT_TRUE(std::filesystem::exists(dir_.file(".imgfs-old.qcow2.removing")));
    bool said = false;
    for (const auto& problem : failed.problems) {
        said = said || (problem.file == "old.qcow2" &&
                        problem.reason.find("renaming its hidden name .imgfs-old.qcow2.removing "
                                            "back failed: cannot rename") != std::string::npos);
    }
    EXPECT_TRUE(said);

    store_->rename_errno = 0;
    ScanPlan restored = plan_scan(in);
    EXPECT_TRUE(std::filesystem::exists(dir_.file("old.qcow2")));
    EXPECT_FALSE(std::filesystem::exists(dir_.file(".imgfs-old.qcow2.removing")));
}

// A splice of two middle layers whose last step failed (the header above them could not be
// rewritten) leaves a served chain that still goes through both, each under its hidden name.
// The walk from the top stopped at the first one (a layer the served chain holds already), so
// the second looked unused and a rescan deleted it: the chain on disk was broken.
TEST_F(UnservedUsersTest, ScanKeepsEveryHiddenLayerOfAServedChain) {
    put(".imgfs-l2.qcow2.removing", "base.qcow2");
    put(".imgfs-l1.qcow2.removing", ".imgfs-l2.qcow2.removing");
    put("top.qcow2", ".imgfs-l1.qcow2.removing");
    ScanPlan plan = scan_serving(
        {"top.qcow2", ".imgfs-l1.qcow2.removing", ".imgfs-l2.qcow2.removing", "base.qcow2"});
    ASSERT_FALSE(plan.failed);
    EXPECT_TRUE(plan.removed.empty()) << plan.removed.front();
    EXPECT_TRUE(std::filesystem::exists(dir_.file(".imgfs-l1.qcow2.removing")));
    EXPECT_TRUE(std::filesystem::exists(dir_.file(".imgfs-l2.qcow2.removing")));
}

// The same chain after a snapshot on top of it (a snapshot is allowed while the edit is
// unfinished): the walk from the new top stops at the old one, a layer the served chain holds,
// and no header the scan reads names the hidden layer. It is served, so it is kept.
TEST_F(UnservedUsersTest, ScanKeepsAHiddenLayerServedBelowANewerTop) {
    put(".imgfs-l1.qcow2.removing", "base.qcow2");
    put("top.qcow2", ".imgfs-l1.qcow2.removing");
    put("new.qcow2", "top.qcow2");
    ScanPlan plan =
        scan_serving({"new.qcow2", "top.qcow2", ".imgfs-l1.qcow2.removing", "base.qcow2"});
    ASSERT_FALSE(plan.failed);
    EXPECT_TRUE(plan.removed.empty()) << plan.removed.front();
    EXPECT_TRUE(std::filesystem::exists(dir_.file(".imgfs-l1.qcow2.removing")));
}

// A middle layer that cannot be read hides where its chain goes: the image below it looked like
// a root of its own and was exported writable, so writes to it changed what the image on top
// showed. Until the layer can be read, no new root is exported; one already served stays.
TEST_F(UnservedUsersTest, AnUnreadableMiddleLayerKeepsTheImagesBelowItFromBeingExported) {
    put("mid.qcow2", "other.qcow2");
    put("top.qcow2", "mid.qcow2");
    ScanInput in;
    in.store = store_.get();
    store_->fail_open["mid.qcow2"] = EIO;
    ScanPlan plan = plan_scan(in);
    ASSERT_FALSE(plan.failed);
    EXPECT_EQ(plan.wanted.count("other"), 0U);
    EXPECT_EQ(plan.wanted.count("top"), 0U);
    EXPECT_EQ(plan.wanted.count("mid"), 0U);
    std::map<std::string, std::string> why;
    for (const ScanProblem& p : plan.problems) {
        why[p.file] = p.reason;
    }
    EXPECT_NE(why["other.qcow2"].find("mid.qcow2 could not be read"), std::string::npos)
        << why["other.qcow2"];

    // Served already: kept (a read error elsewhere does not take a working disk away).
    Result<FileId> other = store_->id_of("other.qcow2", false);
    ASSERT_TRUE(other.ok());
    in.served[1] = {ServedLayer{"other.qcow2", *other}};
    ScanPlan served = plan_scan(in);
    EXPECT_EQ(served.wanted.count("other"), 1U);

    // Readable again: other.qcow2 is a layer, and top.qcow2 the root.
    store_->fail_open.clear();
    in.served.clear();
    ScanPlan again = plan_scan(in);
    EXPECT_EQ(again.wanted.count("other"), 0U);
    EXPECT_EQ(again.wanted.count("top"), 1U);

    // A file that is no image (here one the store refuses as not an image) holds nothing back:
    // QEMU cannot open it either, so its chain uses nothing.
    put("junk.qcow2", "");
    store_->fail_open["junk.qcow2"] = EINVAL;
    ScanPlan junk = plan_scan(in);
    EXPECT_EQ(junk.wanted.count("top"), 1U);
    EXPECT_EQ(junk.wanted.count("junk"), 0U);
}

// A served root that the storage fails to give in one scan (an I/O error, the daemon out of
// descriptors) stays exported: the rescan used to drop every idle export it could not open.
// One whose file is no longer an image goes, as before.
TEST_F(UnservedUsersTest, AServedRootTheStorageFailsToGiveStaysExported) {
    ScanInput in;
    in.store = store_.get();
    Result<FileId> other = store_->id_of("other.qcow2", false);
    ASSERT_TRUE(other.ok());
    in.served[1] = {ServedLayer{"other.qcow2", *other}};
    for (int errnum : {EIO, EMFILE, ENFILE, ETIMEDOUT}) {
        store_->fail_open["other.qcow2"] = errnum;
        ScanPlan plan = plan_scan(in);
        ASSERT_FALSE(plan.failed);
        EXPECT_EQ(plan.wanted.count("other"), 1U) << errnum;
        bool reported = false;
        for (const ScanProblem& p : plan.problems) {
            reported = reported || p.file == "other.qcow2";
        }
        EXPECT_TRUE(reported) << errnum;
        // Not served: not exported until it can be read.
        ScanInput fresh;
        fresh.store = store_.get();
        EXPECT_EQ(plan_scan(fresh).wanted.count("other"), 0U) << errnum;
    }
    store_->fail_open["other.qcow2"] = EINVAL;  // the store says: not an image
    EXPECT_EQ(plan_scan(in).wanted.count("other"), 0U);
}

}  // namespace
}  // namespace imgfs
