// LocalDirStore: the image directory as a Store. Names stay beneath the directory, exclusive
// creation and renames never replace, a second name is the same file, and the serving lock
// keeps a second daemon out.
#include "drivers/local_store.h"

#include <fcntl.h>
#include <fstream>
#include <unistd.h>

#include <gtest/gtest.h>
#include <sys/stat.h>

#include "test_util.h"

namespace imgfs {
namespace {

class LocalDirStoreTest : public ::testing::Test {
  protected:
    void SetUp() override {
        auto s = LocalDirStore::open_dir(dir_.path().string());
        ASSERT_TRUE(s.ok()) << s.error().message();
        store_ = std::move(*s);
    }
    void put(const std::string& name, const std::string& bytes) {
        std::ofstream f(dir_.file(name), std::ios::binary | std::ios::trunc);
        f << bytes;
    }
    std::string content(const std::string& name) {
        std::ifstream f(dir_.file(name), std::ios::binary);
        return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
    }

    test::TempDir dir_;
    std::unique_ptr<LocalDirStore> store_;
};

TEST_F(LocalDirStoreTest, ListsRegularFilesInOrderFollowingLinks) {
    put("b.qcow2", "b");
    put("a.img", "a");
    ASSERT_EQ(::mkdir(dir_.file("sub").c_str(), 0755), 0);
    ASSERT_EQ(::symlink("a.img", dir_.file("link.raw").c_str()), 0);
    ASSERT_EQ(::symlink("missing", dir_.file("dangling.raw").c_str()), 0);
    auto listed = store_->list();
    ASSERT_TRUE(listed.ok()) << listed.error().message();
    std::vector<std::string> names;
    for (const StoreEntry& e : *listed) {
        names.push_back(e.name);
    }
    EXPECT_EQ(names, (std::vector<std::string>{"a.img", "b.qcow2", "link.raw"}));
    // The link lists as the file it points to.
    EXPECT_EQ((*listed)[0].id, (*listed)[2].id);
    EXPECT_NE((*listed)[0].id, (*listed)[1].id);
    // Its own identity is another one.
    auto own = store_->id_of("link.raw", false);
    ASSERT_TRUE(own.ok());
    EXPECT_NE(*own, (*listed)[0].id);
    EXPECT_EQ(store_->id_of("nothing", true).error().errnum, ENOENT);
}

TEST_F(LocalDirStoreTest, OpenStaysBeneathTheDirectory) {
    put("a.img", "data");
    ASSERT_EQ(::symlink("/etc/hostname", dir_.file("out.img").c_str()), 0);
    ASSERT_EQ(::symlink("../x", dir_.file("up.img").c_str()), 0);
    auto ok = store_->open("a.img", true, false);
    ASSERT_TRUE(ok.ok()) << ok.error().message();
    for (const char* bad : {"out.img", "up.img", "../a.img", "/etc/hostname"}) {
        auto r = store_->open(bad, true, false);
        ASSERT_FALSE(r.ok()) << bad;
        EXPECT_EQ(r.error().errnum, EPERM) << bad << ": " << r.error().message();
    }
}

TEST_F(LocalDirStoreTest, OpensOnlyFilesAndNeverWaitsOnAFifo) {
    // A backing name may name a FIFO; opening one for reading waits for a writer.
    ASSERT_EQ(::mkfifo(dir_.file("pipe.raw").c_str(), 0644), 0);
    ASSERT_EQ(::mkdir(dir_.file("sub.raw").c_str(), 0755), 0);
    for (bool read_only : {true, false}) {
        for (const char* name : {"pipe.raw", "sub.raw"}) {
            auto r = store_->open(name, read_only, false);
            ASSERT_FALSE(r.ok()) << name;
            // (A directory opened for writing fails in open(2) already, with EISDIR.)
            if (read_only || std::string(name) == "pipe.raw") {
                EXPECT_EQ(r.error().errnum, EINVAL) << name;
                EXPECT_EQ(r.error().context,
                          fmt::format("'{}' is not a regular file or block device", name));
            }
        }
        auto host = open_host_file(dir_.file("pipe.raw"), read_only, false);
        ASSERT_FALSE(host.ok());
        EXPECT_EQ(host.error().errnum, EINVAL);
    }
}

// A layer's directory swapped for a symbolic link that leads out, after the chain was opened
// through it: the name operations a chain edit makes must not act outside the directory.
TEST_F(LocalDirStoreTest, NameOperationsStayBeneathTheDirectory) {
    test::TempDir outside;
    {
        std::ofstream f(outside.file("victim"), std::ios::binary);
        f << "keep";
    }
    ASSERT_EQ(::mkdir(dir_.file("sub").c_str(), 0755), 0);
    put("sub/mid.qcow2", "m");
    EXPECT_TRUE(store_->rename_noreplace("sub/mid.qcow2", "sub/moved.qcow2").ok());
    EXPECT_TRUE(store_->add_name("sub/moved.qcow2", "sub/second.qcow2").ok());
    EXPECT_TRUE(store_->remove("sub/second.qcow2").ok());
    ASSERT_EQ(::symlink(outside.path().c_str(), dir_.file("out").c_str()), 0);
    EXPECT_EQ(store_->remove("out/victim").error().errnum, EPERM);
    EXPECT_EQ(store_->rename_noreplace("out/victim", "stolen").error().errnum, EPERM);
    EXPECT_EQ(store_->rename_noreplace("sub/moved.qcow2", "out/planted").error().errnum, EPERM);
    EXPECT_EQ(store_->add_name("out/victim", "linked").error().errnum, EPERM);
    EXPECT_EQ(store_->create_exclusive("out/made").error().errnum, EPERM);
    EXPECT_EQ(::access(outside.file("victim").c_str(), F_OK), 0);
    EXPECT_NE(::access(outside.file("planted").c_str(), F_OK), 0);
    EXPECT_NE(::access(outside.file("made").c_str(), F_OK), 0);
    EXPECT_NE(::access(dir_.file("stolen").c_str(), F_OK), 0);
}

TEST_F(LocalDirStoreTest, CreateAndRenameNeverReplace) {
    put("taken.qcow2", "keep");
    EXPECT_EQ(store_->create_exclusive("taken.qcow2").error().errnum, EEXIST);
    auto made = store_->create_exclusive("new.tmp");
    ASSERT_TRUE(made.ok()) << made.error().message();
    ASSERT_EQ(::write(dynamic_cast<LocalFile&>(**made).fd(), "new", 3), 3);
    Status clash = store_->rename_noreplace("new.tmp", "taken.qcow2");
    ASSERT_FALSE(clash.ok());
    EXPECT_EQ(clash.error().errnum, EEXIST);
    EXPECT_EQ(content("taken.qcow2"), "keep");
    ASSERT_TRUE(store_->rename_noreplace("new.tmp", "new.qcow2").ok());
    EXPECT_EQ(content("new.qcow2"), "new");
    EXPECT_EQ(store_->id_of("new.tmp", false).error().errnum, ENOENT);
}

TEST_F(LocalDirStoreTest, SecondNameIsTheSameFileAndOutlivesTheFirst) {
    ASSERT_TRUE(store_->caps().second_names);
    put("a.qcow2", "layer");
    ASSERT_TRUE(store_->add_name("a.qcow2", ".imgfs-a.qcow2.removing").ok());
    EXPECT_EQ(store_->add_name("a.qcow2", ".imgfs-a.qcow2.removing").error().errnum, EEXIST);
    EXPECT_EQ(*store_->id_of("a.qcow2", true), *store_->id_of(".imgfs-a.qcow2.removing", true));
    ASSERT_TRUE(store_->remove("a.qcow2").ok());
    EXPECT_EQ(content(".imgfs-a.qcow2.removing"), "layer");
    EXPECT_EQ(store_->remove("a.qcow2").error().errnum, ENOENT);
    EXPECT_TRUE(store_->sync().ok());
}

TEST_F(LocalDirStoreTest, NameOperationsTakeOnlyNamesOfTheDirectory) {
    put("a.img", "a");
    EXPECT_EQ(store_->remove("../a.img").error().errnum, EINVAL);
    EXPECT_EQ(store_->remove("/etc/hostname").error().errnum, EINVAL);
    EXPECT_EQ(store_->remove("sub/../a.img").error().errnum, EINVAL);
    EXPECT_EQ(store_->remove("./a.img").error().errnum, EINVAL);
    EXPECT_EQ(store_->remove("sub//a.img").error().errnum, EINVAL);
    EXPECT_EQ(store_->remove("sub/a.img").error().errnum, ENOENT);  // a subdirectory is fine
    EXPECT_EQ(store_->create_exclusive("..").error().errnum, EINVAL);
    EXPECT_EQ(store_->rename_noreplace("a.img", "../b.img").error().errnum, EINVAL);
    EXPECT_EQ(store_->add_name("a.img", "").error().errnum, EINVAL);
    EXPECT_EQ(content("a.img"), "a");
}

TEST_F(LocalDirStoreTest, SpaceAndNames) {
    auto space = store_->space();
    ASSERT_TRUE(space.ok()) << space.error().message();
    EXPECT_GT(space->blocks, 0U);
    EXPECT_GT(space->block_bytes, 0U);
    EXPECT_LE(space->available_blocks, space->blocks);
    EXPECT_EQ(store_->display_name(), dir_.path().string());
    char real[PATH_MAX];
    ASSERT_NE(::realpath(dir_.path().c_str(), real), nullptr);
    EXPECT_EQ(store_->real_path(), real);
}

TEST_F(LocalDirStoreTest, ServingLockKeepsASecondDaemonOut) {
    ASSERT_TRUE(store_->lock_for_serving().ok());
    auto second = LocalDirStore::open_dir(dir_.path().string());
    ASSERT_TRUE(second.ok());
    Status refused = (*second)->lock_for_serving();
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.error().errnum, EWOULDBLOCK);
    store_.reset();  // the first daemon goes: its lock goes with the store
    EXPECT_TRUE((*second)->lock_for_serving().ok());
}

TEST_F(LocalDirStoreTest, OpeningAMissingDirectoryNamesIt) {
    auto r = LocalDirStore::open_dir(dir_.file("no-such-dir"));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().errnum, ENOENT);
    EXPECT_NE(r.error().message().find("no-such-dir"), std::string::npos);
}

}  // namespace
}  // namespace imgfs
