// FuseServer: the FUSE protocol engine. Several reads of /dev/fuse are kept in flight through the
// event loop's io_uring; each request read runs as its own coroutine in the server's scope and
// gets exactly one reply, because handlers return their reply and only the server writes it.
//
// Buffers: each request owns a RequestBuffer until its reply is written. A read lands as
// [header area | payload area]: the first iovec takes exactly the WRITE header, so a WRITE
// payload starts at an aligned address and is passed to the block layer in place (never copied,
// never reused before the write completes). READ replies are produced in the payload area.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <linux/fuse.h>

#include "core/buffer.h"
#include "core/event_loop.h"
#include "core/log.h"
#include "core/task_scope.h"
#include "fuse/fuse_uring.h"
#include "fuse/payload_pool.h"
#include "fuse/ring_arena.h"

namespace imgfs {

/// One request, valid while its handler runs.
struct FuseRequest {
    const fuse_in_header* header = nullptr;
    ConstBuf arg;      // the opcode's argument struct and any names after it
    ConstBuf payload;  // WRITE data
    MutBuf scratch;    // aligned space for the reply's data (READ), max_write bytes
};

/// A reply: an errno, or data (none for FORGET-like opcodes).
struct FuseReply {
    int error = 0;      // positive errno
    bool none = false;  // send nothing
    ConstBuf data;      // points into `owned` or into the request's scratch
    std::vector<uint8_t> owned;

    /// 0: success without data. The kernel refuses a reply whose errno is not in 1..511 (on
    /// /dev/fuse it drops the reply, and the caller waits for ever). Kernel-internal codes
    /// that leak out of a system call (ENOTSUPP, 524, from some file systems' fallocate) and
    /// negative values become EOPNOTSUPP and EIO.
    static FuseReply err(int e) {
        constexpr int kKernelEnotsupp = 524;
        FuseReply r;
        r.error = (e >= 0 && e < 512) ? e : e == kKernelEnotsupp ? EOPNOTSUPP : EIO;
        return r;
    }
    static FuseReply no_reply() {
        FuseReply r;
        r.none = true;
        return r;
    }
    template <typename T>
    static FuseReply of(const T& value) {
        FuseReply r;
        r.owned.resize(sizeof(T));
        std::memcpy(r.owned.data(), &value, sizeof(T));
        r.data = r.owned;
        return r;
    }
    static FuseReply bytes(std::vector<uint8_t> v) {
        FuseReply r;
        r.owned = std::move(v);
        r.data = r.owned;
        return r;
    }
    static FuseReply view(ConstBuf b) {
        FuseReply r;
        r.data = b;
        return r;
    }
};

/// The filesystem behind the protocol.
class FuseHandler {
  public:
    virtual ~FuseHandler() = default;
    /// Handles one request (never INIT). Must not keep pointers into `req` after returning.
    virtual Task<FuseReply> handle(FuseRequest* req) = 0;
    /// Called once the kernel has initialised the connection.
    virtual void connected() {}
    /// Called once no more requests come: waits for work the handler started on its own.
    virtual Task<void> finish() { co_return; }
    /// The answer to a well-formed request too large for the server's header area (a
    /// SYMLINK with a long target, a large SETXATTR or IOCTL): what the handler answers such
    /// a request whatever its arguments. FORGETs never get here.
    virtual FuseReply oversized(uint32_t /*opcode*/) { return FuseReply::err(E2BIG); }
};

struct FuseServerOptions {
    uint32_t max_write_bytes = 1U << 20;
    uint32_t reads_in_flight = 8;
    uint32_t max_buffers = 48;
    uint16_t max_background = 64;
    /// FUSE-over-io_uring: kOff serves /dev/fuse only; kAuto and kOn offer it in INIT (the
    /// loop must have big SQEs). kOn refuses the connection if the kernel does not take it.
    fuse_uring::Mode uring = fuse_uring::Mode::kOff;
    /// Ring entries per queue. An entry holds its request until the reply, and requests
    /// beyond the entries of the queue of the client's CPU wait in the kernel, so the entries
    /// bound how deep a client's queue reaches the disk. 64 matches max_background (the
    /// kernel's own bound on asynchronous requests). Fewer entries help where nothing waits
    /// for a device: a COMMIT_AND_FETCH then picks the next waiting request up without a
    /// wake-up (16 gave about 190k against 140k IOPS at QD32 on a raw image in RAM), but on a
    /// disk-backed chain 16 halved 4k QD32 reads (2026-12-03: 20-30k against 32k, and 29-31k
    /// against 38-42k with 2 fio jobs), and the disk is what users have.
    uint32_t uring_entries_per_queue = 64;
    /// More loops to serve ring queues on, each run by its own thread (LoopThread). Queue q
    /// is served by loop q % (1 + size), loop 0 being the server's own. A request still runs
    /// on the server's loop, which owns every image: an entry on another loop hops there with
    /// the request and back with the reply (EventLoop::resume_on). What the other loops carry
    /// is the kernel's half of the transport, which runs inside their io_uring_enter:
    /// delivering requests into the entries, taking the replies and waking the clients.
    std::vector<EventLoop*> ring_loops;
    /// Ring queues to register if more than the kernel keeps (one per possible CPU). Only
    /// tests set it: the kernel refuses the registration then.
    uint32_t ring_queues = 0;
};

class FuseServer {
  public:
    FuseServer(EventLoop* loop, int fuse_fd, FuseHandler* handler, Logger* log,
               FuseServerOptions options);
    FuseServer(const FuseServer&) = delete;
    FuseServer& operator=(const FuseServer&) = delete;
    ~FuseServer();

    /// Serves until the connection ends (unmount), then waits for every request in flight.
    Task<void> run();
    /// After run(): why serving ended other than by an unmount (the kernel aborted the
    /// connection, /dev/fuse kept failing), or success. The mount did not end well then.
    [[nodiscard]] Status end_status() const;

    /// After the `failures`th read of /dev/fuse in a row failed with `error`: how long to wait
    /// before reading again, or nothing if serving ends (the connection is gone, or the error
    /// persisted through kReadRetries tries).
    static std::optional<std::chrono::milliseconds> read_retry_delay(int error, int failures);
    static constexpr int kReadRetries = 10;

    [[nodiscard]] uint64_t requests_served() const { return served_; }
    [[nodiscard]] uint32_t max_concurrent() const { return max_concurrent_; }
    [[nodiscard]] uint32_t kernel_minor() const { return kernel_minor_; }
    /// Which transport serves the requests: "io_uring (Q queues x E entries)" or "/dev/fuse",
    /// with the reason when a ring the kernel accepted is not in use.
    [[nodiscard]] std::string transport() const;
    /// Called once INIT is answered: success, or why the connection was refused (uring=on
    /// without the ring). The mount is only usable, and so only reported up, after it.
    void on_init(std::function<void(const Status&)> callback) { on_init_ = std::move(callback); }

  private:
    struct RequestBuffer;
    struct RingEntry {
        AlignedBuffer header;  // fuse_uring::ReqHeader
        AlignedBuffer arg;     // a request's argument struct and names, made contiguous
        MutBuf payload;        // max_write_bytes, in ring_arena_
        uint16_t qid = 0;
        EventLoop* loop = nullptr;  // issues the entry's commands (see ring_loops)
    };
    Task<void> reader();
    /// Stops serving for `why` (the first reason is kept for end_status()).
    void stop_for(Error why);
    /// One ring entry: registers it, then serves one request at a time through it.
    Task<void> ring_entry(RingEntry* entry);
    /// Counts a registration the kernel refused (after settle_ring(), also says so).
    void note_refused_entry(uint16_t qid, int error);
    /// Once every entry's registration has reached the kernel: which transport serves, in
    /// one log line, and only then the INIT callback (uring=on fails without the ring).
    Task<void> settle_ring();
    /// On the server's loop: the request in `entry`'s buffers, answered in them.
    Task<void> serve_ring_request(RingEntry* entry);
    Task<FuseReply> dispatch(FuseRequest* req);
    /// The answer to a well-formed request too large for the argument area (only a large
    /// extended attribute can be): what a handler would answer, as no handler can read it.
    FuseReply oversized_request_reply(uint32_t opcode);
    bool offer_uring(uint32_t kernel_flags, uint32_t kernel_flags2, uint32_t* flags,
                     uint32_t* flags2);
    void start_ring();
    Task<void> process(RequestBuffer* buf, size_t length);
    Task<FuseReply> handle_init(FuseRequest* req);
    void init_done(const Status& result);
    Task<void> send(uint64_t unique, FuseReply reply);
    Task<RequestBuffer*> take_buffer();
    void give_buffer(RequestBuffer* buf);

    EventLoop* loop_;
    int fd_;
    FuseHandler* handler_;
    Logger* log_;
    FuseServerOptions options_;
    TaskScope scope_;                   // every reader and request coroutine; run() joins it
    std::optional<Error> ended_badly_;  // see end_status()
    // Set by a reader that found the connection gone; read by ring entries on other loops.
    std::atomic<bool> connection_ended_{false};
    // Outlives nothing that points into it: buffers_ (views into the pool) is destroyed first,
    // and no read is in flight once run() has joined scope_.
    PayloadPool payload_pool_;
    std::vector<std::unique_ptr<RequestBuffer>> buffers_;
    std::vector<RequestBuffer*> free_;
    WaitQueue buffer_freed_;
    // FUSE-over-io_uring. The entries' payload buffers stay registered with the kernel for the
    // whole connection; ring_arena_ outlives them for the same reason as payload_pool_.
    std::unique_ptr<RingArena> ring_arena_;
    std::vector<std::unique_ptr<RingEntry>> ring_entries_;
    uint32_t ring_queues_ = 0;     // registered
    uint32_t kernel_queues_ = 0;   // kept by the kernel: one per possible CPU
    bool uring_accepted_ = false;  // INIT offered it and the kernel takes it
    // Registrations the kernel refused. One refusal switches the ring off for the whole
    // connection (unless the kernel had switched to it already).
    std::vector<uint32_t> ring_refused_;  // per queue
    uint32_t ring_refused_total_ = 0;
    // Registrations that ended because the connection did, before the ring settled.
    uint32_t ring_lost_before_settling_ = 0;
    // For settle_ring, counted on each entry's own loop: entries that have put their REGISTER
    // in their ring, entries waiting to send it again (ENOMEM, EAGAIN), and registrations
    // that failed, with the last counted again on this loop once the entry is back.
    std::atomic<uint32_t> ring_registers_sent_{0};
    std::atomic<uint32_t> ring_registers_retrying_{0};
    std::atomic<uint32_t> ring_registers_failed_{0};
    uint32_t ring_registers_failed_back_ = 0;
    uint16_t first_refused_qid_ = 0;
    bool ring_in_use_ = false;  // settle_ring() found an entry registered in every queue
    int ring_refusal_errno_ = 0;
    bool ring_settled_ = false;  // settle_ring() has decided
    uint64_t ring_served_ = 0;   // requests that came through the ring
    std::string uring_refusal_;  // why INIT did not take the ring
    std::function<void(const Status&)> on_init_;
    uint32_t ring_remote_ = 0;  // entries served by another loop and not yet ended
    bool stopping_ = false;
    bool initialised_ = false;
    uint32_t kernel_minor_ = 0;
    uint64_t served_ = 0;
    uint32_t active_ = 0;
    uint32_t max_concurrent_ = 0;
};

}  // namespace imgfs
