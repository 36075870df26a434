// FuseServer: its policy for a failed read of /dev/fuse, and the protocol engine against a
// misbehaving kernel. The well-behaved kernel is the integration tests' (real mounts); here a
// SOCK_SEQPACKET socket pair stands in for /dev/fuse (one message per read and per write, as
// the device gives), so a test can send what the kernel should never send.
#include "fuse/fuse_server.h"

#include <cstring>
#include <unistd.h>
#include <vector>

#include <gtest/gtest.h>
#include <sys/socket.h>

#include "core/task_scope.h"

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

// Answers WRITE with the size it got and remembers it; everything else with ENOSYS.
class RecordingHandler final : public FuseHandler {
  public:
    Task<FuseReply> handle(FuseRequest* req) override {
        opcodes.push_back(req->header->opcode);
        if (req->header->opcode != FUSE_WRITE) {
            co_return FuseReply::err(ENOSYS);
        }
        written.assign(req->payload.begin(), req->payload.end());
        fuse_write_in in{};
        std::memcpy(&in, req->arg.data(), std::min(req->arg.size(), sizeof in));
        fuse_write_out out{};
        out.size = in.size;
        co_return FuseReply::of(out);
    }
    void connected() override { ++connections; }
    FuseReply oversized(uint32_t opcode) override {
        oversized_opcodes.push_back(opcode);
        return FuseReply::err(E2BIG);
    }

    std::vector<uint32_t> opcodes;  // handed to handle()
    std::vector<uint8_t> written;   // the last WRITE's payload
    std::vector<uint32_t> oversized_opcodes;
    int connections = 0;
};

struct KernelReply {
    fuse_out_header header{};
    std::vector<uint8_t> data;
};

// The kernel's end of the socket pair. Requests are sent whole; `claimed_len` (if set) is
// what the header says the request's length is, to send a lying one.
class FakeKernel {
  public:
    FakeKernel(EventLoop* loop, int fd) : loop_(loop), fd_(fd) {}

    Task<int32_t> send(uint32_t opcode, std::vector<uint8_t> arg, uint64_t unique,
                       uint32_t claimed_len = 0) {
        std::vector<uint8_t> message(sizeof(fuse_in_header) + arg.size());
        fuse_in_header h{};
        h.len = claimed_len != 0 ? claimed_len : static_cast<uint32_t>(message.size());
        h.opcode = opcode;
        h.unique = unique;
        h.nodeid = FUSE_ROOT_ID;
        std::memcpy(message.data(), &h, sizeof h);
        std::memcpy(message.data() + sizeof h, arg.data(), arg.size());
        co_return co_await loop_->write_some(fd_, message, 0);
    }

    Task<KernelReply> receive() {
        std::vector<uint8_t> message(1 << 16);
        int32_t n = co_await loop_->read_some(fd_, message, 0);
        KernelReply reply;
        if (n >= static_cast<int32_t>(sizeof(fuse_out_header))) {
            std::memcpy(&reply.header, message.data(), sizeof reply.header);
            reply.data.assign(message.begin() + sizeof(fuse_out_header), message.begin() + n);
        } else {
            ADD_FAILURE() << "reading a reply gave " << n;
        }
        co_return reply;
    }

    Task<KernelReply> call(uint32_t opcode, std::vector<uint8_t> arg, uint64_t unique) {
        int32_t sent = co_await send(opcode, std::move(arg), unique);
        EXPECT_GT(sent, 0);
        co_return co_await receive();
    }

  private:
    EventLoop* loop_;
    int fd_;
};

template <typename T>
std::vector<uint8_t> bytes_of(const T& value) {
    std::vector<uint8_t> out(sizeof value);
    std::memcpy(out.data(), &value, sizeof value);
    return out;
}

std::vector<uint8_t> init_arg() {
    fuse_init_in in{};
    in.major = FUSE_KERNEL_VERSION;
    in.minor = FUSE_KERNEL_MINOR_VERSION;
    in.max_readahead = 128 * 1024;
    in.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES;
    return bytes_of(in);
}

class FuseServerProtocolTest : public ::testing::Test {
  protected:
    void SetUp() override {
        ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds_), 0);
        auto loop = EventLoop::create();
        ASSERT_TRUE(loop) << loop.error().message();
        loop_ = std::move(*loop);
    }
    void TearDown() override {
        ::close(fds_[0]);
        ::close(fds_[1]);
    }

    // Runs the server on fds_[0] while `script` drives fds_[1]; when the script is done its
    // end hangs up, which ends the server's reads, and both are joined.
    void serve(Task<void> script) {
        FuseServerOptions options;
        options.max_write_bytes = 128 * 1024;
        options.max_buffers = 8;
        FuseServer server(loop_.get(), fds_[0], &handler_, &log_, options);
        server.on_init([this](const Status& st) { init_results_.push_back(st.ok()); });
        sync_wait(loop_.get(), serve_and_drive(loop_.get(), &server, std::move(script), fds_[1]));
    }

    static Task<void> hang_up_after(Task<void> script, int kernel_fd) {
        co_await std::move(script);
        ::shutdown(kernel_fd, SHUT_RDWR);
    }
    static Task<void> serve_and_drive(EventLoop* loop, FuseServer* server, Task<void> script,
                                      int kernel_fd) {
        TaskScope scope(loop);
        scope.spawn(server->run());
        scope.spawn(hang_up_after(std::move(script), kernel_fd));
        co_await scope.join();
    }

    FakeKernel kernel() { return FakeKernel(loop_.get(), fds_[1]); }

    int fds_[2] = {-1, -1};
    std::unique_ptr<EventLoop> loop_;
    RecordingHandler handler_;
    CaptureLogger log_;
    std::vector<bool> init_results_;
};

Task<void> connect_then_init_again(FakeKernel kernel) {
    KernelReply first = co_await kernel.call(FUSE_INIT, init_arg(), 1);
    EXPECT_EQ(first.header.error, 0);
    EXPECT_EQ(first.header.unique, 1U);
    EXPECT_EQ(first.data.size(), sizeof(fuse_init_out));
    // A second INIT would renegotiate a connection in use: refused as the kernel bug it is.
    KernelReply second = co_await kernel.call(FUSE_INIT, init_arg(), 2);
    EXPECT_EQ(second.header.error, -EPROTO);
    EXPECT_EQ(second.header.unique, 2U);
    // And the connection is served on as before.
    KernelReply after = co_await kernel.call(FUSE_GETATTR, std::vector<uint8_t>(16), 3);
    EXPECT_EQ(after.header.error, -ENOSYS);
    EXPECT_EQ(after.header.unique, 3U);
}

TEST_F(FuseServerProtocolTest, ASecondInitIsRefusedAndTheConnectionGoesOn) {
    serve(connect_then_init_again(kernel()));
    EXPECT_EQ(handler_.connections, 1);
    EXPECT_EQ(init_results_, std::vector<bool>{true});  // reported up once
    EXPECT_EQ(handler_.opcodes, std::vector<uint32_t>{FUSE_GETATTR});
    EXPECT_TRUE(log_.contains("second FUSE INIT")) << testing::PrintToString(log_.lines());
}

Task<void> request_before_init(FakeKernel kernel) {
    KernelReply early = co_await kernel.call(FUSE_GETATTR, std::vector<uint8_t>(16), 7);
    EXPECT_EQ(early.header.error, -EIO);
    EXPECT_EQ(early.header.unique, 7U);
}

TEST_F(FuseServerProtocolTest, NothingIsServedBeforeInit) {
    serve(request_before_init(kernel()));
    EXPECT_TRUE(handler_.opcodes.empty());
}

Task<void> short_and_whole_writes(FakeKernel kernel) {
    KernelReply init = co_await kernel.call(FUSE_INIT, init_arg(), 1);
    EXPECT_EQ(init.header.error, 0);
    // A WRITE that ends inside its fuse_write_in: the argument would be read from what the
    // buffer's previous request left there.
    KernelReply short_write = co_await kernel.call(FUSE_WRITE, std::vector<uint8_t>(8, 0xee), 2);
    EXPECT_EQ(short_write.header.error, -EIO);
    EXPECT_EQ(short_write.header.unique, 2U);
    // A whole one reaches the handler with its payload intact.
    fuse_write_in in{};
    in.offset = 4096;
    in.size = 5000;
    std::vector<uint8_t> arg = bytes_of(in);
    for (uint32_t i = 0; i < in.size; ++i) {
        arg.push_back(static_cast<uint8_t>(i * 7));
    }
    KernelReply whole = co_await kernel.call(FUSE_WRITE, arg, 3);
    EXPECT_EQ(whole.header.error, 0);
    EXPECT_EQ(whole.data.size(), sizeof(fuse_write_out));
}

TEST_F(FuseServerProtocolTest, AWriteShorterThanItsHeaderGetsEio) {
    serve(short_and_whole_writes(kernel()));
    ASSERT_EQ(handler_.opcodes, std::vector<uint32_t>{FUSE_WRITE});  // the whole one only
    ASSERT_EQ(handler_.written.size(), 5000U);
    for (uint32_t i = 0; i < 5000; ++i) {
        ASSERT_EQ(handler_.written[i], static_cast<uint8_t>(i * 7)) << i;
    }
    EXPECT_TRUE(log_.contains("less than its header")) << testing::PrintToString(log_.lines());
}

Task<void> lying_lengths(FakeKernel kernel) {
    KernelReply init = co_await kernel.call(FUSE_INIT, init_arg(), 1);
    EXPECT_EQ(init.header.error, 0);
    // The header claims more (and then less) than arrived: nothing in it can be trusted, not
    // even its unique, so it gets no reply and the next request is served.
    std::vector<uint8_t> arg(16);
    int32_t claims_more = co_await kernel.send(FUSE_GETATTR, arg, 2, 4096);
    EXPECT_GT(claims_more, 0);
    int32_t claims_less = co_await kernel.send(FUSE_GETATTR, arg, 3, 20);
    EXPECT_GT(claims_less, 0);
    KernelReply next = co_await kernel.call(FUSE_GETATTR, arg, 4);
    EXPECT_EQ(next.header.unique, 4U);
    EXPECT_EQ(next.header.error, -ENOSYS);
}

TEST_F(FuseServerProtocolTest, ARequestWhoseLengthLiesIsDropped) {
    serve(lying_lengths(kernel()));
    EXPECT_EQ(handler_.opcodes, std::vector<uint32_t>{FUSE_GETATTR});
    EXPECT_TRUE(log_.contains("malformed FUSE request")) << testing::PrintToString(log_.lines());
}

Task<void> oversized_requests(FakeKernel kernel) {
    KernelReply init = co_await kernel.call(FUSE_INIT, init_arg(), 1);
    EXPECT_EQ(init.header.error, 0);
    // Larger than the header area (4 KiB) and not a WRITE: answered without being parsed.
    KernelReply big = co_await kernel.call(FUSE_SETXATTR, std::vector<uint8_t>(8192, 'x'), 2);
    EXPECT_EQ(big.header.error, -E2BIG);
    EXPECT_EQ(big.header.unique, 2U);
    // A FORGET gets no reply at all (the kernel waits for none), however large.
    int32_t forget_sent = co_await kernel.send(FUSE_BATCH_FORGET, std::vector<uint8_t>(8192), 3);
    EXPECT_GT(forget_sent, 0);
    KernelReply next = co_await kernel.call(FUSE_GETATTR, std::vector<uint8_t>(16), 4);
    EXPECT_EQ(next.header.unique, 4U);
}

TEST_F(FuseServerProtocolTest, OversizedRequestsAreAnsweredWithoutBeingRead) {
    serve(oversized_requests(kernel()));
    EXPECT_EQ(handler_.oversized_opcodes, std::vector<uint32_t>{FUSE_SETXATTR});
    EXPECT_EQ(handler_.opcodes, std::vector<uint32_t>{FUSE_GETATTR});
}

}  // namespace
}  // namespace imgfs
