// RbdStore against a throwaway Ceph cluster: the Store contract as a pool keeps it (listing
// with identities, no-replace create and rename, removal, what it refuses), the rbd: spec
// parser, and the backing-name forms.
#include "drivers/rbd/rbd_store.h"

#include "ceph_util.h"
#include "core/backend.h"
#include "drivers/image_chain.h"

namespace imgfs::test {
namespace {

TEST(RbdLocationTest, ParsesPoolAndNamespace) {
    auto a = parse_rbd_location("rbd:pool1");
    ASSERT_TRUE(a.ok()) << a.error().message();
    EXPECT_EQ(a->pool, "pool1");
    EXPECT_EQ(a->name_space, "");
    auto b = parse_rbd_location("rbd:pool1/ns");
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(b->name_space, "ns");
    for (const char* bad :
         {"rbd:", "rbd:/ns", "rbd:p/", "rbd:p/a/b", "rbd:p@s", "rbd:p:conf=x", "pool", "rbd:.."}) {
        auto r = parse_rbd_location(bad);
        EXPECT_FALSE(r.ok()) << bad;
        if (!r.ok()) {
            EXPECT_EQ(r.error().errnum, EINVAL) << bad;
        }
    }
    EXPECT_TRUE(is_rbd_spec("rbd:x"));
    EXPECT_FALSE(is_rbd_spec("./rbd:x"));
}

class RbdStoreTest : public CephLoopTest {
  protected:
    void SetUp() override {
        CephLoopTest::SetUp();
        if (ceph_unusable()) {
            return;
        }
        int st = 0;
        cluster_->rbd("namespace create rbd/" + ns(), &st);
        ASSERT_EQ(st, 0);
        auto s = RbdStore::open(RbdLocation{"rbd", ns()}, rados_options(*cluster_), loop_.get());
        ASSERT_TRUE(s.ok()) << s.error().message();
        store_ = std::move(*s);
    }
    void TearDown() override {
        store_.reset();
        LoopTest::TearDown();
    }
    static std::string ns() {
        return ::testing::UnitTest::GetInstance()->current_test_info()->name();
    }

    std::unique_ptr<RbdStore> store_;
};

TEST_F(RbdStoreTest, NamesAndIdentities) {
    EXPECT_EQ(store_->display_name(), "rbd:rbd/" + ns());
    EXPECT_FALSE(store_->caps().second_names);
    EXPECT_EQ(store_->caps().snapshot_separator, '~');
    auto made = store_->create_exclusive("b.qcow2");
    ASSERT_TRUE(made.ok()) << made.error().message();
    const FileId id = (*made)->id();
    made->reset();
    EXPECT_EQ(store_->create_exclusive("b.qcow2").error().errnum, EEXIST);
    ASSERT_TRUE(store_->create_exclusive("a.raw").ok());
    auto listed = store_->list();
    ASSERT_TRUE(listed.ok()) << listed.error().message();
    ASSERT_EQ(listed->size(), 2u);
    EXPECT_EQ((*listed)[0].name, "a.raw");
    EXPECT_EQ((*listed)[1].name, "b.qcow2");
    EXPECT_EQ((*listed)[1].id, id);
    EXPECT_NE((*listed)[0].id, id);
    // A rename keeps the identity and never replaces.
    EXPECT_EQ(store_->rename_noreplace("b.qcow2", "a.raw").error().errnum, EEXIST);
    ASSERT_TRUE(store_->rename_noreplace("b.qcow2", "c.qcow2").ok());
    auto moved = store_->id_of("c.qcow2", false);
    ASSERT_TRUE(moved.ok());
    EXPECT_EQ(*moved, id);
    EXPECT_EQ(store_->id_of("b.qcow2", false).error().errnum, ENOENT);
    EXPECT_EQ(store_->add_name("c.qcow2", "d.qcow2").error().errnum, EOPNOTSUPP);
    ASSERT_TRUE(store_->remove("c.qcow2").ok());
    EXPECT_EQ(store_->remove("c.qcow2").error().errnum, ENOENT);
    // Names imgfs cannot address are read (none of these exists) but never written or made.
    for (const char* bad : {"x/y", "x@s", "a:b", ""}) {
        EXPECT_EQ(store_->open(bad, true, false).error().errnum, ENOENT) << bad;
        EXPECT_EQ(store_->open(bad, false, false).error().errnum,
                  std::string(bad).find('/') == std::string::npos && *bad != 0 ? EINVAL : ENOENT)
            << bad;
        EXPECT_EQ(store_->create_exclusive(bad).error().errnum, EINVAL) << bad;
    }
    EXPECT_EQ(store_->open("missing", true, false).error().errnum, ENOENT);
}

TEST_F(RbdStoreTest, BackingNamesInTheStoresOwnForm) {
    const std::string url = "rbd:rbd/" + ns() + "/base.qcow2";
    EXPECT_EQ(store_->recorded_name("base.qcow2"), url);
    EXPECT_EQ(store_->own_name(url), "base.qcow2");
    EXPECT_EQ(store_->own_name("rbd:other/base.qcow2"), "");
    EXPECT_EQ(store_->own_name(url + "@snap"), "");
    EXPECT_EQ(store_->own_name(url + ":conf=/x"), "");
    EXPECT_EQ(store_->own_name("base.qcow2"), "");
    // The confinement rule: a relative name stays in the namespace, a host path is refused.
    EXPECT_EQ(resolve_backing_in(store_.get(), "top.qcow2", "base.qcow2", false).value(),
              "base.qcow2");
    for (bool allow_external : {false, true}) {
        auto host =
            resolve_backing_in(store_.get(), "top.qcow2", "/tmp/base.qcow2", allow_external);
        ASSERT_FALSE(host.ok());
        EXPECT_EQ(host.error().errnum, EPERM);
        EXPECT_NE(host.error().message().find("outside the image directory"), std::string::npos);
    }
    EXPECT_FALSE(resolve_backing_in(store_.get(), "top.qcow2", "../base.qcow2", false).ok());
    // Another pool or namespace of the cluster: only with allow_external_backing, named as
    // recorded; with options or a snapshot, never.
    for (const std::string other :
         {"rbd:golden/base.qcow2", "rbd:rbd/other/base.qcow2", "rbd:rbd/base.qcow2"}) {
        EXPECT_EQ(store_->external_name(other), other);
        auto refused = resolve_backing_in(store_.get(), "top.qcow2", other, false);
        ASSERT_FALSE(refused.ok()) << other;
        EXPECT_EQ(refused.error().errnum, EPERM);
        EXPECT_NE(refused.error().message().find("allow_external_backing"), std::string::npos);
        EXPECT_EQ(resolve_backing_in(store_.get(), "top.qcow2", other, true).value(), other);
    }
    EXPECT_EQ(store_->external_name(url), "");  // its own image
    for (const std::string bad : {"rbd:golden/base.qcow2@snap", "rbd:golden/base.qcow2:conf=/x",
                                  "rbd:golden", "rbd:a/b/c/d", "rbd:golden//x"}) {
        EXPECT_EQ(store_->external_name(bad), "") << bad;
        EXPECT_FALSE(resolve_backing_in(store_.get(), "top.qcow2", bad, true).ok()) << bad;
    }
}

TEST_F(RbdStoreTest, ReadsAndServesWhatItStores) {
    auto made = store_->create_exclusive("data.raw");
    ASSERT_TRUE(made.ok());
    auto node = (*made)->into_node(env(), "data.raw", FileOptions{});
    ASSERT_TRUE(node.ok()) << node.error().message();
    use_rw(*node);
    std::vector<uint8_t> bytes(8192, 0x42);
    Status w = run((*node)->write(4096, ConstBuf(bytes.data(), bytes.size())));
    ASSERT_TRUE(w.ok()) << w.error().message();
    ASSERT_TRUE(run((*node)->flush()).ok());
    // A writer holds the image (a store locks what it creates): opening it elsewhere for
    // writing is refused.
    auto second = RbdStore::open(RbdLocation{"rbd", ns()}, rados_options(*cluster_), loop_.get());
    ASSERT_TRUE(second.ok());
    FileOptions exclusive;
    exclusive.exclusive = true;
    auto refused = run((*second)->open_from_loop("data.raw", exclusive));
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.error().errnum, EBUSY);
    EXPECT_NE(refused.error().message().find("RBD exclusive lock"), std::string::npos);
    // While it is written the image has room grown ahead; closing gives it back, and the
    // lock with it.
    EXPECT_EQ((*store_->open("data.raw", true, false))->size().value(), 4u << 20);
    ASSERT_TRUE(run((*node)->close()).ok());
    EXPECT_TRUE(run((*second)->open_from_loop("data.raw", exclusive)).ok());
    auto opened = store_->open("data.raw", true, false);
    ASSERT_TRUE(opened.ok());
    auto size = (*opened)->size();
    ASSERT_TRUE(size.ok());
    EXPECT_EQ(*size, 12288u);
    AlignedBuffer buf(16384);
    auto got = (*opened)->read_at(buf.span(), 0);
    ASSERT_TRUE(got.ok()) << got.error().message();
    EXPECT_EQ(*got, 12288u);  // short at the end of the image
    EXPECT_EQ(buf.data()[4095], 0);
    EXPECT_EQ(buf.data()[4096], 0x42);
    // Reading is for everyone.
    EXPECT_TRUE(run((*second)->open_from_loop("data.raw", FileOptions{.read_only = true})).ok());
}

// Hosts that mount one pool all serve an image until one of them writes it: the first write
// takes the exclusive lock, and from then on the others read it but cannot write it (EROFS
// naming the holder) or open it for writing again (EBUSY).
TEST_F(RbdStoreTest, TheFirstWriteTakesTheLock) {
    int st = 0;
    cluster_->rbd("create --size 4M rbd/" + ns() + "/vm.raw", &st);
    ASSERT_EQ(st, 0);
    auto second = RbdStore::open(RbdLocation{"rbd", ns()}, rados_options(*cluster_), loop_.get());
    ASSERT_TRUE(second.ok());
    FileOptions writable;
    writable.exclusive = true;
    std::vector<BlockBackend*> hosts;
    for (Store* store : {static_cast<Store*>(store_.get()), static_cast<Store*>(second->get())}) {
        auto file = run(store->open_from_loop("vm.raw", writable));
        ASSERT_TRUE(file.ok()) << file.error().message();
        auto node = (*file)->into_node(env(), "vm.raw", writable);
        ASSERT_TRUE(node.ok()) << node.error().message();
        EXPECT_TRUE((*node)->claim_pending());
        hosts.push_back(use_rw(*node));
    }
    std::vector<uint8_t> ones(4096, 0x11);
    Status first = run(hosts[0]->write(0, ConstBuf(ones.data(), ones.size())));
    ASSERT_TRUE(first.ok()) << first.error().message();
    EXPECT_FALSE(hosts[0]->claim_pending());
    ASSERT_TRUE(run(hosts[0]->flush()).ok());

    std::vector<uint8_t> twos(4096, 0x22);
    Status refused = run(hosts[1]->write(4096, ConstBuf(twos.data(), twos.size())));
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.error().errnum, EROFS);
    EXPECT_NE(refused.error().message().find("vm.raw is being written by "), std::string::npos)
        << refused.error().message();
    EXPECT_EQ(hosts[1]->io_failure().errnum, EROFS);  // what status shows
    EXPECT_TRUE(hosts[1]->claim_pending());
    // The other host still reads what the writer wrote.
    AlignedBuffer buf(8192);
    ASSERT_TRUE(run(hosts[1]->read(0, buf.span())).ok());
    EXPECT_EQ(buf.data()[0], 0x11);
    EXPECT_EQ(buf.data()[4096], 0);
    // A third host may not even open it for writing now.
    auto third = RbdStore::open(RbdLocation{"rbd", ns()}, rados_options(*cluster_), loop_.get());
    ASSERT_TRUE(third.ok());
    auto busy = run((*third)->open_from_loop("vm.raw", writable));
    ASSERT_FALSE(busy.ok());
    EXPECT_EQ(busy.error().errnum, EBUSY);
    EXPECT_NE(busy.error().message().find("RBD exclusive lock"), std::string::npos);
}

// A layer this host only reads is open as far as other hosts can tell: it is listed among
// the image's users (another host's rescan does not take it for an abandoned edit) and the
// pool refuses to remove it under the reader. librbd's own read-only open shows neither.
TEST_F(RbdStoreTest, ALayerOpenOnlyForReadingIsInUseForOtherHosts) {
    int st = 0;
    cluster_->rbd("create --size 4M rbd/" + ns() + "/base.raw", &st);
    ASSERT_EQ(st, 0);
    auto other = RbdStore::open(RbdLocation{"rbd", ns()}, rados_options(*cluster_), loop_.get());
    ASSERT_TRUE(other.ok()) << other.error().message();
    auto elsewhere = store_->open_elsewhere("base.raw");
    ASSERT_TRUE(elsewhere.ok()) << elsewhere.error().message();
    EXPECT_FALSE(*elsewhere);  // nobody has it open yet, and the look itself does not count

    FileOptions read_only;
    read_only.read_only = true;
    auto file = run((*other)->open_from_loop("base.raw", read_only));
    ASSERT_TRUE(file.ok()) << file.error().message();
    elsewhere = store_->open_elsewhere("base.raw");
    ASSERT_TRUE(elsewhere.ok()) << elsewhere.error().message();
    EXPECT_TRUE(*elsewhere);
    Status removed = store_->remove("base.raw");
    ASSERT_FALSE(removed.ok());
    EXPECT_EQ(removed.error().errnum, EBUSY) << removed.error().message();
    EXPECT_NE(cluster_->rbd("ls rbd/" + ns()).find("base.raw"), std::string::npos);
    // The reader takes no lock: a writer elsewhere still can.
    FileOptions writable;
    writable.exclusive = true;
    auto writer = run(store_->open_from_loop("base.raw", writable));
    ASSERT_TRUE(writer.ok()) << writer.error().message();
    auto node = (*writer)->into_node(env(), "base.raw", writable);
    ASSERT_TRUE(node.ok()) << node.error().message();
    std::vector<uint8_t> ones(4096, 0x11);
    Status wrote = run(use_rw(*node)->write(0, ConstBuf(ones.data(), ones.size())));
    EXPECT_TRUE(wrote.ok()) << wrote.error().message();
}

}  // namespace
}  // namespace imgfs::test
