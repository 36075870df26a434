// FuseServer's policy for a failed read of /dev/fuse (the server itself runs against the
// kernel in the integration tests).
#include "fuse/fuse_server.h"

#include <gtest/gtest.h>

namespace imgfs {
namespace {

using std::chrono::milliseconds;

TEST(FuseServerReadErrors, TheConnectionGoneEndsServingAtOnce) {
    for (int error : {ENODEV, EBADF, ECONNABORTED}) {
        EXPECT_FALSE(FuseServer::read_retry_delay(error, 1).has_value()) << error;
    }
}

// A read that fails for another reason (memory, a fault copying into our buffer) may pass:
// ending there would unmount under a loop device in use. It is tried again, later each time,
// and given up only when it persists.
TEST(FuseServerReadErrors, OtherErrorsAreTriedAgainWithGrowingPauses) {
    EXPECT_EQ(FuseServer::read_retry_delay(ENOMEM, 1), milliseconds(10));
    EXPECT_EQ(FuseServer::read_retry_delay(EFAULT, 2), milliseconds(20));
    EXPECT_EQ(FuseServer::read_retry_delay(ENOMEM, 8), milliseconds(1000));
    EXPECT_EQ(FuseServer::read_retry_delay(ENOMEM, FuseServer::kReadRetries), milliseconds(1000));
    EXPECT_FALSE(FuseServer::read_retry_delay(ENOMEM, FuseServer::kReadRetries + 1).has_value());
}

// Replies carry only errnos the kernel takes: 1..511. Others made the kernel drop the reply.
TEST(FuseReplyErrors, OnlyErrnosTheKernelTakesAreSent) {
    EXPECT_EQ(FuseReply::err(ENOSPC).error, ENOSPC);
    EXPECT_EQ(FuseReply::err(511).error, 511);
    EXPECT_EQ(FuseReply::err(524).error, EOPNOTSUPP);  // the kernel's ENOTSUPP
    EXPECT_EQ(FuseReply::err(512).error, EIO);
    EXPECT_EQ(FuseReply::err(-5).error, EIO);
    EXPECT_EQ(FuseReply::err(0).error, 0);  // success without data
}

}  // namespace
}  // namespace imgfs
