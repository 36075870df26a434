// pread_full/pwrite_full: whole transfers, the end of the file, errors.
#include "core/blocking_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "test_util.h"

namespace imgfs {
namespace {

TEST(BlockingIo, WritesAllAndReadsUpToTheEnd) {
    test::TempDir dir;
    UniqueFd fd(::open(dir.file("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd.valid());
    std::vector<uint8_t> data(300000, 0x5a);
    ASSERT_TRUE(pwrite_full(fd.get(), data, 4096).ok());
    std::vector<uint8_t> back(400000, 0xff);
    auto got = pread_full(fd.get(), back, 4096);
    ASSERT_TRUE(got.ok()) << got.error().message();
    EXPECT_EQ(*got, data.size());  // short: the file ends
    EXPECT_TRUE(std::equal(data.begin(), data.end(), back.begin()));
    auto hole = pread_full(fd.get(), MutBuf(back.data(), 4096), 0);
    ASSERT_TRUE(hole.ok());
    EXPECT_EQ(*hole, 4096U);
    EXPECT_EQ(back[0], 0);  // the gap before the write reads as zeros
}

TEST(BlockingIo, ErrorsCarryTheErrno) {
    std::vector<uint8_t> buf(16);
    EXPECT_EQ(pread_full(-1, buf, 0).error().errnum, EBADF);
    EXPECT_EQ(pwrite_full(-1, buf, 0).error().errnum, EBADF);
}

}  // namespace
}  // namespace imgfs
