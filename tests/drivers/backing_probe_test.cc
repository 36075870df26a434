// The backing probe on byte-level fixtures: images built by the qcow2 creator, then changed
// field by field, written to a temporary directory and probed both ways (blocking, as the scan
// does on the offload thread, and on the event loop, as open_chain does). Both must agree.
#include "drivers/backing_probe.h"

#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "drivers/image_chain.h"
#include "drivers/local_store.h"
#include "drivers/qcow2/create.h"
#include "drivers/qcow2/format.h"
#include "test_util.h"

namespace imgfs {
namespace {

using qcow2::store_be32;
using qcow2::store_be64;

std::vector<uint8_t> qcow2_image(const std::string& backing = "",
                                 std::optional<std::string> backing_format = std::nullopt) {
    qcow2::CreateOptions o;
    o.size = 1 << 20;
    o.backing_file = backing;
    o.backing_format = std::move(backing_format);
    Result<std::vector<uint8_t>> img = qcow2::build_new_image(o);
    EXPECT_TRUE(img.ok()) << img.error().message();
    return img.ok() ? std::move(*img) : std::vector<uint8_t>();
}

class BackingProbeTest : public test::LoopTest {
  protected:
    void SetUp() override {
        LoopTest::SetUp();
        dir_fd_ = ::open(dir_.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        ASSERT_GE(dir_fd_, 0);
    }
    void TearDown() override {
        ::close(dir_fd_);
        LoopTest::TearDown();
    }

    void put(const std::string& name, const std::vector<uint8_t>& bytes) {
        std::ofstream f(dir_.file(name), std::ios::binary | std::ios::trunc);
        f.write(reinterpret_cast<const char*>(bytes.data()),
                static_cast<std::streamsize>(bytes.size()));
        ASSERT_TRUE(f.good());
    }

    // Probes `name` blocking and on the loop, checks that both give the same answer, and
    // returns it.
    Result<ImageProbe> probe(const std::string& name) {
        Result<ImageProbe> blocking = probe_image(LocalDirStore::over(dir_fd_).get(), name);
        auto file = LocalDirStore::over(dir_fd_)->open(name, true, false);
        EXPECT_TRUE(file.ok());
        if (!file.ok()) {
            return std::move(file).error();
        }
        const FileId id = (*file)->id();
        auto node = (*file)->into_node(env(), name, FileOptions{.read_only = true});
        EXPECT_TRUE(node.ok());
        if (!node.ok()) {
            return std::move(node).error();
        }
        Result<ImageProbe> looped = run(probe_node(node->get(), id, name));
        EXPECT_EQ(blocking.ok(), looped.ok());
        if (blocking.ok() && looped.ok()) {
            EXPECT_EQ(blocking->id, looped->id);
            EXPECT_EQ(blocking->format, looped->format);
            EXPECT_EQ(blocking->backing, looped->backing);
            EXPECT_EQ(blocking->backing_format, looped->backing_format);
            EXPECT_EQ(blocking->header_error.has_value(), looped->header_error.has_value());
            if (blocking->header_error && looped->header_error) {
                EXPECT_EQ(blocking->header_error->message(), looped->header_error->message());
            }
        }
        return blocking;
    }

    test::TempDir dir_{test::memory_backed()};
    int dir_fd_ = -1;
};

TEST_F(BackingProbeTest, RawFileIsRawWithoutBacking) {
    std::vector<uint8_t> bytes(3 * 4096 + 17, 0xab);
    put("disk.img", bytes);
    Result<ImageProbe> p = probe("disk.img");
    ASSERT_TRUE(p.ok()) << p.error().message();
    EXPECT_EQ(p->format, "raw");
    EXPECT_EQ(p->backing, "");
    EXPECT_FALSE(p->header_error);
    EXPECT_EQ(p->file_bytes, bytes.size());
}

TEST_F(BackingProbeTest, EmptyAndTinyFilesAreRaw) {
    put("empty.img", {});
    put("tiny.img", {'Q', 'F'});
    for (const char* name : {"empty.img", "tiny.img"}) {
        Result<ImageProbe> p = probe(name);
        ASSERT_TRUE(p.ok()) << p.error().message();
        EXPECT_EQ(p->format, "raw") << name;
        EXPECT_FALSE(p->header_error) << name;
    }
}

TEST_F(BackingProbeTest, Qcow2WithoutBacking) {
    put("base.qcow2", qcow2_image());
    Result<ImageProbe> p = probe("base.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    EXPECT_EQ(p->format, "qcow2");
    EXPECT_EQ(p->backing, "");
    EXPECT_FALSE(p->backing_format);
    EXPECT_FALSE(p->header_error);
}

TEST_F(BackingProbeTest, Qcow2WithBackingNameAndFormat) {
    put("vm1.qcow2", qcow2_image("base.raw", "raw"));
    Result<ImageProbe> p = probe("vm1.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    EXPECT_EQ(p->format, "qcow2");
    EXPECT_EQ(p->backing, "base.raw");
    EXPECT_EQ(p->backing_format, "raw");
    EXPECT_FALSE(p->header_error);
}

TEST_F(BackingProbeTest, BackingNamePastTheFirstBlockIsRead) {
    // The name placed at the end of the 64 KiB header cluster: the probe must read that far,
    // and no farther than the cluster.
    std::vector<uint8_t> img = qcow2_image();
    const std::string name = "far-away-base.qcow2";
    const uint64_t off = 65536 - name.size();
    std::memcpy(img.data() + off, name.data(), name.size());
    store_be64(img.data() + qcow2::kOffBackingFileOffset, off);
    store_be32(img.data() + qcow2::kOffBackingFileSize, static_cast<uint32_t>(name.size()));
    put("far.qcow2", img);
    Result<ImageProbe> p = probe("far.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    EXPECT_FALSE(p->header_error) << p->header_error->message();
    EXPECT_EQ(p->backing, name);
}

TEST_F(BackingProbeTest, TruncatedHeaderIsAHeaderError) {
    std::vector<uint8_t> img = qcow2_image("base.raw", "raw");
    img.resize(60);  // the magic, but not even a version 2 header
    put("cut.qcow2", img);
    Result<ImageProbe> p = probe("cut.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    EXPECT_EQ(p->format, "qcow2");
    ASSERT_TRUE(p->header_error);
    EXPECT_EQ(p->header_error->errnum, EINVAL);
    EXPECT_NE(p->header_error->context.find("cut.qcow2"), std::string::npos);
    EXPECT_EQ(p->backing, "");
}

TEST_F(BackingProbeTest, ImplausibleBackingLengthIsAHeaderError) {
    std::vector<uint8_t> img = qcow2_image("base.raw", "raw");
    store_be64(img.data() + qcow2::kOffBackingFileOffset, 4096);
    store_be32(img.data() + qcow2::kOffBackingFileSize, 1024);  // the limit is 1023
    put("long.qcow2", img);
    Result<ImageProbe> p = probe("long.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    ASSERT_TRUE(p->header_error);
    EXPECT_NE(p->header_error->context.find("backing file name (1024 bytes at 4096) is invalid"),
              std::string::npos)
        << p->header_error->message();
}

TEST_F(BackingProbeTest, BackingOffsetOutsideTheClusterIsAHeaderError) {
    std::vector<uint8_t> img = qcow2_image("base.raw", "raw");
    store_be64(img.data() + qcow2::kOffBackingFileOffset, 128 * 1024);
    store_be32(img.data() + qcow2::kOffBackingFileSize, 8);
    put("off.qcow2", img);
    Result<ImageProbe> p = probe("off.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    ASSERT_TRUE(p->header_error);
    EXPECT_NE(p->header_error->context.find("backing file name lies outside the header cluster"),
              std::string::npos)
        << p->header_error->message();
}

TEST_F(BackingProbeTest, NameOutsideTheDirectoryIsRecordedButRefusedOnResolve) {
    put("esc.qcow2", qcow2_image("../outside/secret.img", "raw"));
    Result<ImageProbe> p = probe("esc.qcow2");
    ASSERT_TRUE(p.ok()) << p.error().message();
    EXPECT_EQ(p->backing, "../outside/secret.img");
    Result<std::string> r = resolve_backing("esc.qcow2", p->backing, dir_.path().string(), false);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().errnum, EPERM);
    EXPECT_NE(r.error().context.find("escapes the image directory"), std::string::npos);
}

TEST_F(BackingProbeTest, SymlinkOutOfTheDirectoryIsNotProbed) {
    test::TempDir outside(test::memory_backed());
    {
        std::ofstream f(outside.file("secret.img"));
        f << "secret";
    }
    ASSERT_EQ(::symlink(outside.file("secret.img").c_str(), dir_.file("link.img").c_str()), 0);
    Result<ImageProbe> p = probe_image(LocalDirStore::over(dir_fd_).get(), "link.img");
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.error().errnum, EPERM);
    EXPECT_NE(p.error().context.find("resolves outside the image directory"), std::string::npos);
}

TEST_F(BackingProbeTest, HardLinksHaveOneIdentity) {
    put("a.qcow2", qcow2_image());
    ASSERT_EQ(::link(dir_.file("a.qcow2").c_str(), dir_.file("b.qcow2").c_str()), 0);
    Result<ImageProbe> a = probe("a.qcow2");
    Result<ImageProbe> b = probe("b.qcow2");
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->id, b->id);
}

TEST_F(BackingProbeTest, BackingFieldOfAServedImage) {
    put("vm1.qcow2", qcow2_image("base.qcow2", "qcow2"));
    put("base.qcow2", qcow2_image());
    put("raw.img", std::vector<uint8_t>(4096, 1));
    for (auto [name, want] : {std::pair{"vm1.qcow2", "base.qcow2"}, std::pair{"base.qcow2", ""},
                              std::pair{"raw.img", ""}}) {
        auto file = LocalDirStore::over(dir_fd_)->open(name, true, false);
        ASSERT_TRUE(file.ok());
        Result<std::string> b = read_backing_field(file->get(), name);
        ASSERT_TRUE(b.ok()) << b.error().message();
        EXPECT_EQ(*b, want) << name;
    }
    // A size that counts a terminating NUL (some writers do): the name ends at the NUL, as the
    // header parser reads it, or the scan takes the served chain for another one.
    std::vector<uint8_t> nul = qcow2_image("base.qcow2", "qcow2");
    uint64_t name_at = qcow2::load_be64(nul.data() + qcow2::kOffBackingFileOffset);
    ASSERT_EQ(nul.at(name_at + 10), 0);
    store_be32(nul.data() + qcow2::kOffBackingFileSize, 11);
    put("nul.qcow2", nul);
    {
        auto file = LocalDirStore::over(dir_fd_)->open("nul.qcow2", true, false);
        ASSERT_TRUE(file.ok());
        Result<std::string> b = read_backing_field(file->get(), "nul.qcow2");
        ASSERT_TRUE(b.ok()) << b.error().message();
        EXPECT_EQ(*b, "base.qcow2");
    }
    std::vector<uint8_t> img = qcow2_image("base.qcow2", "qcow2");
    store_be32(img.data() + qcow2::kOffBackingFileSize, 5000);
    put("bad.qcow2", img);
    auto file = LocalDirStore::over(dir_fd_)->open("bad.qcow2", true, false);
    ASSERT_TRUE(file.ok());
    Result<std::string> b = read_backing_field(file->get(), "bad.qcow2");
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.error().errnum, EINVAL);
}

// open_chain and the probe together: the chain walk's rules as a mount meets them.
TEST_F(BackingProbeTest, OpenChainRefusesLoops) {
    put("a.qcow2", qcow2_image("b.qcow2", "qcow2"));
    put("b.qcow2", qcow2_image("a.qcow2", "qcow2"));
    Result<Chain> c =
        run(open_chain(env(), LocalDirStore::over(dir_fd_).get(), "a.qcow2", ChainOptions{}));
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.error().errnum, ELOOP);
    EXPECT_NE(c.error().context.find("loops (a.qcow2 -> b.qcow2 -> a.qcow2)"), std::string::npos)
        << c.error().message();
}

TEST_F(BackingProbeTest, OpenChainRefusesTooDeepChains) {
    put("l0.qcow2", qcow2_image());
    for (int i = 1; i < 5; ++i) {
        put(fmt::format("l{}.qcow2", i), qcow2_image(fmt::format("l{}.qcow2", i - 1), "qcow2"));
    }
    ChainOptions o;
    o.max_depth = 4;
    Result<Chain> c = run(open_chain(env(), LocalDirStore::over(dir_fd_).get(), "l4.qcow2", o));
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.error().errnum, ELOOP);
    EXPECT_NE(c.error().context.find("backing chain of 'l4.qcow2' is deeper than 4 layers"),
              std::string::npos)
        << c.error().message();
    o.max_depth = 5;
    Result<Chain> ok = run(open_chain(env(), LocalDirStore::over(dir_fd_).get(), "l4.qcow2", o));
    ASSERT_TRUE(ok.ok()) << ok.error().message();
    EXPECT_EQ(ok->layers.size(), 5U);
    EXPECT_TRUE(run(close_chain(&*ok)).ok());
}

// Layers shared through the cache count as if this chain had opened them: whether a chain is
// too deep must not depend on which image was opened first.
TEST_F(BackingProbeTest, OpenChainCountsLayersItSharesThroughTheCache) {
    put("l0.qcow2", qcow2_image());
    for (int i = 1; i < 4; ++i) {
        put(fmt::format("l{}.qcow2", i), qcow2_image(fmt::format("l{}.qcow2", i - 1), "qcow2"));
    }
    put("r0.qcow2", qcow2_image("l2.qcow2", "qcow2"));
    put("r1.qcow2", qcow2_image("r0.qcow2", "qcow2"));
    ChainOptions o;
    o.max_depth = 4;
    LayerCache cache;
    auto store = LocalDirStore::over(dir_fd_);
    Result<Chain> first = run(open_chain(env(), store.get(), "l3.qcow2", o, &cache));
    ASSERT_TRUE(first.ok()) << first.error().message();
    ASSERT_EQ(cache.chains.count("l2.qcow2"), 1U);
    // r1 -> r0 -> l2 -> l1 -> l0: five layers, three of them from the cache.
    Result<Chain> c = run(open_chain(env(), store.get(), "r1.qcow2", o, &cache));
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.error().errnum, ELOOP);
    EXPECT_NE(c.error().context.find("backing chain of 'r1.qcow2' is deeper than 4 layers"),
              std::string::npos)
        << c.error().message();
    Result<Chain> r0 = run(open_chain(env(), store.get(), "r0.qcow2", o, &cache));
    ASSERT_TRUE(r0.ok()) << r0.error().message();
    EXPECT_EQ(r0->layers.size(), 4U);
    // The shared layers belong to the first chain: close only what each chain opened itself.
    EXPECT_TRUE(run(r0->layers.front().node->close()).ok());
    EXPECT_TRUE(run(close_chain(&*first)).ok());
}

}  // namespace
}  // namespace imgfs
