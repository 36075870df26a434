// The node interface for backing names (Node::backing_file_name, set_backing_name and the
// backing_name capability) on a qcow2 node and on a raw one, through plain Node pointers, as
// jobs use it.
#include <string>

#include <gtest/gtest.h>

#include "drivers/backing_probe.h"
#include "drivers/image_chain.h"
#include "drivers/local_store.h"
#include "drivers/qcow2/create.h"
#include "image_test_util.h"

namespace imgfs {
namespace {

class BackingNameTest : public test::LoopTest {
  protected:
    void make_qcow2(const std::string& name, const std::string& backing,
                    std::optional<std::string> format) {
        qcow2::CreateOptions o;
        o.size = 1 << 20;
        o.backing_file = backing;
        o.backing_format = std::move(format);
        Result<std::vector<uint8_t>> img = qcow2::build_new_image(o);
        ASSERT_TRUE(img.ok()) << img.error().message();
        test::write_file(dir_.file(name), *img);
    }
    Chain open(const std::string& name) {
        Result<Chain> c =
            run(open_chain(env(), LocalDirStore::over(dir_.fd()).get(), name, ChainOptions{}));
        EXPECT_TRUE(c.ok()) << c.error().message();
        return c.ok() ? std::move(*c) : Chain{};
    }

    test::ImageDir dir_;
};

TEST_F(BackingNameTest, Qcow2NodeReportsAndRewritesItsBackingName) {
    test::write_file(dir_.file("base.raw"), std::vector<uint8_t>(1 << 20, 0x5a));
    test::write_file(dir_.file("other.raw"), std::vector<uint8_t>(1 << 20, 0x33));
    make_qcow2("vm1.qcow2", "base.raw", "raw");
    {
        Chain c = open("vm1.qcow2");
        ASSERT_EQ(c.layers.size(), 2U);
        Node* top = c.top().get();
        EXPECT_TRUE(top->caps().backing_name);
        EXPECT_EQ(top->backing_file_name(), "base.raw");
        EXPECT_EQ(top->backing_format(), "raw");
        use_rw(c.top());
        Status st = run(top->set_backing_name("other.raw", "raw"));
        ASSERT_TRUE(st.ok()) << st.error().message();
        EXPECT_EQ(top->backing_file_name(), "other.raw");
        ASSERT_TRUE(run(close_chain(&c)).ok());
        users_.clear();
    }
    // On disk too, as the probe (and so a scan) reads it.
    Result<ImageProbe> p = probe_image(LocalDirStore::over(dir_.fd()).get(), "vm1.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    EXPECT_FALSE(p->header_error);
    EXPECT_EQ(p->backing, "other.raw");
    EXPECT_EQ(p->backing_format, "raw");
    Chain again = open("vm1.qcow2");
    ASSERT_EQ(again.layers.size(), 2U);
    EXPECT_EQ(again.layers[1].file, "other.raw");
    ASSERT_TRUE(run(close_chain(&again)).ok());
}

// Every rewrite puts the new name where the old header uses nothing (the end of the first
// cluster, or just before the old name there), so that the header write that follows changes
// only fields of its first sector: a write torn by a power cut cannot pair the new offset and
// length with bytes of the old name. Before, the second rewrite wrote header and name in one go.
TEST_F(BackingNameTest, EachRewriteWritesTheNameClearOfTheOldOne) {
    for (const char* f : {"base.raw", "a-longer-name.raw", "b.raw", "c-name.raw"}) {
        test::write_file(dir_.file(f), std::vector<uint8_t>(1 << 20, 0));
    }
    make_qcow2("vm1.qcow2", "base.raw", "raw");
    auto be = [](const std::vector<uint8_t>& b, size_t at, int bytes) {
        uint64_t v = 0;
        for (int i = 0; i < bytes; ++i) {
            v = v << 8 | b[at + static_cast<size_t>(i)];
        }
        return v;
    };
    // Where the header extensions end (past their end marker): the header write covers no more.
    auto extensions_end = [&be](const std::vector<uint8_t>& h) {
        size_t at = be(h, 100, 4);  // header_length
        while (be(h, at, 4) != 0) {
            at += 8 + (be(h, at + 4, 4) + 7) / 8 * 8;
        }
        return at + 8;
    };
    auto name_range = [this, &be]() {
        std::vector<uint8_t> h = test::read_file(dir_.file("vm1.qcow2"));
        uint64_t off = be(h, 8, 8);
        return std::pair<uint64_t, uint64_t>(off, off + be(h, 16, 4));
    };
    std::pair<uint64_t, uint64_t> before = name_range();
    Chain c = open("vm1.qcow2");
    use_rw(c.top());
    for (const char* name : {"a-longer-name.raw", "b.raw", "c-name.raw", "base.raw"}) {
        ASSERT_TRUE(run(c.top()->set_backing_name(name, "raw")).ok()) << name;
        std::pair<uint64_t, uint64_t> now = name_range();
        EXPECT_TRUE(now.second <= before.first || now.first >= before.second)
            << name << ": [" << now.first << ", " << now.second << ") overlaps [" << before.first
            << ", " << before.second << ")";
        // Not part of the header write (which would write header and name in one go).
        EXPECT_GT(now.first, extensions_end(test::read_file(dir_.file("vm1.qcow2")))) << name;
        Result<ImageProbe> p = probe_image(LocalDirStore::over(dir_.fd()).get(), "vm1.qcow2");
        ASSERT_TRUE(p.ok()) << p.error().message();
        EXPECT_EQ(p->backing, name);
        before = now;
    }
    ASSERT_TRUE(run(close_chain(&c)).ok());
    users_.clear();
}

TEST_F(BackingNameTest, EmptyNameMakesTheImageStandAlone) {
    test::write_file(dir_.file("base.raw"), std::vector<uint8_t>(1 << 20, 0));
    make_qcow2("vm1.qcow2", "base.raw", "raw");
    {
        Chain c = open("vm1.qcow2");
        use_rw(c.top());
        ASSERT_TRUE(run(c.top()->set_backing_name("", std::nullopt)).ok());
        EXPECT_EQ(c.top()->backing_file_name(), "");
        EXPECT_FALSE(c.top()->backing_format());
        ASSERT_TRUE(run(close_chain(&c)).ok());
        users_.clear();
    }
    Chain again = open("vm1.qcow2");
    EXPECT_EQ(again.layers.size(), 1U);
    ASSERT_TRUE(run(close_chain(&again)).ok());
}

TEST_F(BackingNameTest, RawNodeHasNoBackingNameField) {
    test::write_file(dir_.file("disk.raw"), std::vector<uint8_t>(1 << 20, 0));
    Chain c = open("disk.raw");
    ASSERT_EQ(c.layers.size(), 1U);
    Node* top = c.top().get();
    EXPECT_FALSE(top->caps().backing_name);
    EXPECT_EQ(top->backing_file_name(), "");
    EXPECT_FALSE(top->backing_format());
    Status st = run(top->set_backing_name("x.raw", "raw"));
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EINVAL);
    EXPECT_NE(st.error().context.find("records no backing file name"), std::string::npos);
    ASSERT_TRUE(run(close_chain(&c)).ok());
}

}  // namespace
}  // namespace imgfs
