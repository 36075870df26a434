// The raw format: pass-through, and the first-sector guard for guessed formats.
#include "drivers/raw.h"

#include <cstring>

#include <gtest/gtest.h>

#include "core/transaction.h"
#include "drivers/null.h"
#include "fake_node.h"
#include "test_util.h"

namespace imgfs {
namespace {

using test::MemNode;

class RawTest : public test::LoopTest {};

TEST_F(RawTest, ProbedRawRefusesImageMagicInFirstSector) {
    auto mem = std::make_shared<MemNode>(env(), "disk.img", 1 << 20);
    Transaction tx(&graph_);
    auto raw = RawNode::open(env(), "disk.img", &tx, mem, RawOptions{true});
    ASSERT_TRUE(tx.commit().ok());
    use_rw(raw);

    std::vector<uint8_t> sector(512, 0);
    std::memcpy(sector.data(), "QFI\xfb", 4);
    Status st = run(raw->write(0, sector));
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EPERM);
    EXPECT_NE(st.error().context.find("qcow2"), std::string::npos);

    // Unaligned: only the first 4 bytes; the guard still sees a whole sector (RMW).
    st = run(raw->write(0, ConstBuf(sector.data(), 4)));
    EXPECT_FALSE(st.ok());
    EXPECT_EQ(mem->data[0], 0);

    // Elsewhere, and harmless content in sector 0, are fine.
    EXPECT_TRUE(run(raw->write(512, sector)).ok());
    sector[0] = 'X';
    EXPECT_TRUE(run(raw->write(0, sector)).ok());
    EXPECT_EQ(mem->data[0], 'X');
}

// A raw layer whose format an overlay records is guarded too: after a commit into it, or once
// the overlay is gone, it is a root again, and a root's format is guessed.
TEST_F(RawTest, ARecordedRawFormatIsGuardedToo) {
    auto mem = std::make_shared<MemNode>(env(), "disk.img", 1 << 20);
    Transaction tx(&graph_);
    auto raw = RawNode::open(env(), "disk.img", &tx, mem, RawOptions{false});
    ASSERT_TRUE(tx.commit().ok());
    use_rw(raw);
    std::vector<uint8_t> sector(512, 0);
    std::memcpy(sector.data(), "QFI\xfb", 4);
    Status st = run(raw->write(0, sector));
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().errnum, EPERM);
    EXPECT_TRUE(run(raw->write(512, sector)).ok());  // past the first sector: anything goes
}

TEST_F(RawTest, DetectsKnownMagics) {
    EXPECT_STREQ(detect_image_magic(ConstBuf(reinterpret_cast<const uint8_t*>("QFI\xfbxxxx"), 8)),
                 "qcow2");
    EXPECT_STREQ(detect_image_magic(ConstBuf(reinterpret_cast<const uint8_t*>("conectix"), 8)),
                 "vpc");
    EXPECT_EQ(detect_image_magic(ConstBuf(reinterpret_cast<const uint8_t*>("hello wo"), 8)),
              nullptr);
}

Task<Status> null_ops(Node* n) {
    std::vector<uint8_t> b(4096, 0xff);
    CO_TRY(co_await n->write(0, b));
    CO_TRY(co_await n->read(0, b));
    if (b[0] != 0) {
        co_return make_error(EIO, "null read not zero");
    }
    co_return Status{};
}

TEST_F(RawTest, NullNodeReadsZeros) {
    NullNode n(env(), "null", NullOptions{1 << 20, true});
    EXPECT_TRUE(run(null_ops(&n)).ok());
}

}  // namespace
}  // namespace imgfs
