#include "fuse/fuse_server.h"

#include <algorithm>
#include <cstring>
#include <unistd.h>

namespace imgfs {

namespace {

// What a WRITE request puts before its payload; the first read iovec is exactly this long.
constexpr size_t kWriteHeaderBytes = sizeof(fuse_in_header) + sizeof(fuse_write_in);
constexpr size_t kHeaderAreaBytes = 4096;
// Payload pages are given back to the kernel only when the pool holds more than this many
// touched bytes. Giving them back on every release made each big request fault in and zero
// fresh pages inside the /dev/fuse read (about a quarter of the daemon's CPU on 1 MiB
// writes); the budget keeps a steady stream of big requests on resident pages while one burst
// still does not keep the whole pool resident.
constexpr size_t kResidentBudgetBytes = 48 * 1024 * 1024;
// READ replies up to this size are produced in small pages of their own, so that 4 KiB random
// reads keep no huge page of the payload pool resident.
constexpr size_t kSmallReplyBytes = 64 * 1024;
constexpr uint32_t kOurMinor = 38;

}  // namespace

struct FuseServer::RequestBuffer {
    AlignedBuffer header;       // kHeaderAreaBytes
    AlignedBuffer small_reply;  // kSmallReplyBytes, ordinary pages
    MutBuf payload;             // max_write_bytes in the payload pool, page aligned
    uint32_t index = 0;         // in the payload pool
    size_t payload_used = 0;    // payload bytes the current request touched
};

FuseServer::FuseServer(EventLoop* loop, int fuse_fd, FuseHandler* handler, Logger* log,
                       FuseServerOptions options)
    : loop_(loop),
      fd_(fuse_fd),
      handler_(handler),
      log_(log),
      options_(options),
      scope_(loop),
      payload_pool_(options.max_write_bytes, options.max_buffers, kResidentBudgetBytes),
      buffer_freed_(loop) {}

FuseServer::~FuseServer() = default;

Task<FuseServer::RequestBuffer*> FuseServer::take_buffer() {
    for (;;) {
        if (!free_.empty()) {
            RequestBuffer* b = free_.back();  // the most recently used: its pages are resident
            free_.pop_back();
            payload_pool_.acquire(b->index);
            co_return b;
        }
        if (buffers_.size() < payload_pool_.capacity()) {
            auto b = std::make_unique<RequestBuffer>();
            b->header = AlignedBuffer(kHeaderAreaBytes);
            b->small_reply = AlignedBuffer(kSmallReplyBytes);
            b->index = static_cast<uint32_t>(buffers_.size());
            b->payload = payload_pool_.buffer(b->index);
            payload_pool_.acquire(b->index);
            buffers_.push_back(std::move(b));
            co_return buffers_.back().get();
        }
        co_await buffer_freed_.wait();
    }
}

void FuseServer::give_buffer(RequestBuffer* buf) {
    payload_pool_.release(buf->index, buf->payload_used);
    buf->payload_used = 0;
    free_.push_back(buf);
    buffer_freed_.notify_one();
}

Status FuseServer::end_status() const {
    return ended_badly_ ? Status(*ended_badly_) : Status{};
}

void FuseServer::stop_for(Error why) {
    if (!ended_badly_) {
        log_->error("{}", why.message());
        ended_badly_ = std::move(why);
    }
    stopping_ = true;
}

Task<void> FuseServer::run() {
    if (!payload_pool_.ok()) {
        stop_for(make_error(ENOMEM, "cannot reserve {} MiB of address space for FUSE buffers",
                            size_t{options_.max_write_bytes} * options_.max_buffers >> 20));
        co_await handler_->finish();
        co_return;
    }
    for (uint32_t i = 0; i < options_.reads_in_flight; ++i) {
        scope_.spawn(reader());
    }
    co_await scope_.join();
    co_await handler_->finish();
}

std::optional<std::chrono::milliseconds> FuseServer::read_retry_delay(int error, int failures) {
    if (error == ENODEV || error == EBADF || error == ECONNABORTED || failures > kReadRetries) {
        return std::nullopt;
    }
    // Anything else (ENOMEM or EFAULT while the kernel copies into our buffer) may pass, and
    // ending here would unmount under a loop device in use: 10 ms, doubling up to 1 s.
    return std::chrono::milliseconds(std::min(1000, 10 << std::min(failures - 1, 7)));
}

Task<void> FuseServer::reader() {
    int failures = 0;  // reads that failed in a row
    while (!stopping_) {
        RequestBuffer* buf = co_await take_buffer();
        if (stopping_) {
            give_buffer(buf);
            break;
        }
        iovec iov[2] = {{buf->header.data(), kWriteHeaderBytes},
                        {buf->payload.data(), buf->payload.size()}};
        // /dev/fuse has no non-blocking read (it ignores IOCB_NOWAIT), yet io_uring tries one
        // on the loop's thread whenever poll says a request is pending. On a loop that defers
        // its completions (EventLoop::create) that read can find the request gone to another
        // of our reads and sleep in the loop's thread until a request comes that the waiting
        // client never sends: a mount with uring=off hung at 4k QD1 that way. There every
        // read goes to one of io_uring's workers (IOSQE_ASYNC); the daemon defers completions
        // only when it expects the ring transport, where this path carries little. Otherwise
        // the reads stay as they were: inline reads serve 2.5 times the requests at QD32.
        const bool in_worker = loop_->defers_completions();
        int32_t res = co_await loop_->submit_work_wait([this, &iov, &in_worker](io_uring_sqe* sqe) {
            io_uring_prep_readv(sqe, fd_, iov, 2, 0);
            if (in_worker) {
                sqe->flags |= IOSQE_ASYNC;
            }
        });
        if (res == -EINTR || res == -EAGAIN || res == -ENOENT) {
            give_buffer(buf);  // ENOENT: the request was interrupted before we read it
            continue;
        }
        if (res < 0) {
            give_buffer(buf);
            std::optional<std::chrono::milliseconds> delay = read_retry_delay(-res, ++failures);
            if (!delay) {
                if (res == -ECONNABORTED) {
                    // Only an abort through the control file system reads so (we ask for
                    // FUSE_ABORT_ERROR); an unmount reads ENODEV.
                    stop_for(make_error(ECONNABORTED,
                                        "the FUSE connection was aborted (through "
                                        "/sys/fs/fuse/connections): the requests in flight "
                                        "failed, and the mount no longer works"));
                } else if (res != -ENODEV && res != -EBADF) {
                    stop_for(make_error(-res,
                                        "reading /dev/fuse failed {} times in a row; "
                                        "stopping",
                                        failures));
                }
                if (res == -ENODEV || res == -ECONNABORTED) {
                    connection_ended_.store(true);
                }
                stopping_ = true;  // unmounted (ENODEV) or broken: stop serving
                break;
            }
            log_->warn("reading /dev/fuse failed ({}); trying again in {} ms", strerror(-res),
                       delay->count());
            co_await loop_->sleep(*delay);
            continue;
        }
        if (res == 0) {
            // /dev/fuse never ends a read with nothing: that is a device (or a socket standing
            // in for it in tests) whose other end went away. Reading on would spin.
            if (!stopping_) {
                stop_for(make_error(EIO, "the FUSE device returned no request; stopping"));
            }
            give_buffer(buf);
            stopping_ = true;
            break;
        }
        failures = 0;
        scope_.spawn(process(buf, static_cast<size_t>(res)));
    }
}

Task<void> FuseServer::process(RequestBuffer* buf, size_t length) {
    ++active_;
    max_concurrent_ = std::max(max_concurrent_, active_);
    ++served_;
    uint8_t* head = buf->header.data();
    auto* h = reinterpret_cast<fuse_in_header*>(head);
    FuseRequest req;
    req.header = h;
    req.scratch = buf->payload;
    const bool valid = length >= sizeof(fuse_in_header) && h->len == length;
    bool fits = true;
    if (valid && h->opcode == FUSE_WRITE) {
        req.arg = ConstBuf(head + sizeof(fuse_in_header), sizeof(fuse_write_in));
        req.payload = ConstBuf(buf->payload.data(), length - std::min(length, kWriteHeaderBytes));
        buf->payload_used = req.payload.size();
    } else if (valid) {
        // Everything else is small: make it contiguous after the header.
        size_t spill = length > kWriteHeaderBytes ? length - kWriteHeaderBytes : 0;
        if (kWriteHeaderBytes + spill > kHeaderAreaBytes) {
            fits = false;  // well-formed, but larger than any request imgfs serves
        } else {
            std::memcpy(head + kWriteHeaderBytes, buf->payload.data(), spill);
            buf->payload_used = spill;
            req.arg = ConstBuf(head + sizeof(fuse_in_header), length - sizeof(fuse_in_header));
        }
    }
    if (valid && h->opcode == FUSE_READ && req.arg.size() >= sizeof(fuse_read_in) &&
        reinterpret_cast<const fuse_read_in*>(req.arg.data())->size <= kSmallReplyBytes) {
        req.scratch = buf->small_reply.span();
    }
    FuseReply reply;
    uint64_t unique = valid ? h->unique : 0;
    // Only the INIT that connects starts the ring; dispatch refuses any later one.
    const bool init = valid && h->opcode == FUSE_INIT && !initialised_;
    if (!valid) {
        log_->error("malformed FUSE request ({} bytes); ignoring it", length);
        reply = FuseReply::err(EIO);
    } else if (h->opcode == FUSE_WRITE && length < kWriteHeaderBytes) {
        // Its argument would be read from what the buffer's previous request left there.
        log_->error("malformed FUSE WRITE ({} bytes, less than its header)", length);
        reply = FuseReply::err(EIO);
    } else if (!fits) {
        // Still answered: a request without a reply keeps its caller waiting for ever.
        reply = oversized_request_reply(h->opcode);
    } else {
        reply = co_await dispatch(&req);
    }
    const auto data_at = reinterpret_cast<uintptr_t>(reply.data.data());
    const auto payload_at = reinterpret_cast<uintptr_t>(buf->payload.data());
    if (reply.error == 0 && !reply.data.empty() && data_at >= payload_at &&
        data_at < payload_at + buf->payload.size()) {
        // A READ reply produced in the payload area touched those pages.
        buf->payload_used =
            std::max<size_t>(buf->payload_used, data_at - payload_at + reply.data.size());
    }
    if (valid && !reply.none) {
        co_await send(unique, std::move(reply));
    }
    give_buffer(buf);
    --active_;
    if (init && uring_accepted_) {
        start_ring();  // REGISTER works only once the kernel has processed the INIT reply
    }
}

Task<FuseReply> FuseServer::dispatch(FuseRequest* req) {
    if (req->header->opcode == FUSE_INIT) {
        if (initialised_) {
            // A kernel bug: a second INIT would replace the ring buffers the kernel holds.
            log_->error("a second FUSE INIT on a connected mount; refusing it");
            co_return FuseReply::err(EPROTO);
        }
        co_return co_await handle_init(req);
    }
    if (!initialised_) {
        co_return FuseReply::err(EIO);
    }
    co_return co_await handler_->handle(req);
}

FuseReply FuseServer::oversized_request_reply(uint32_t opcode) {
    switch (opcode) {
        case FUSE_FORGET:
        case FUSE_BATCH_FORGET:
            return FuseReply::no_reply();  // the kernel waits for no answer; a lost forget
                                           // only keeps an inode's lookup count up
        default:
            return handler_->oversized(opcode);
    }
}

void FuseServer::init_done(const Status& result) {
    if (on_init_) {
        auto callback = std::move(on_init_);  // once: a second INIT is refused as a bug
        on_init_ = nullptr;
        callback(result);
    }
}

Task<FuseReply> FuseServer::handle_init(FuseRequest* req) {
    if (req->arg.size() < offsetof(fuse_init_in, flags) + sizeof(uint32_t)) {
        init_done(make_error(EINVAL, "the kernel's FUSE INIT request is too short"));
        co_return FuseReply::err(EINVAL);
    }
    fuse_init_in in{};
    std::memcpy(&in, req->arg.data(), std::min(req->arg.size(), sizeof in));
    fuse_init_out out{};
    out.major = FUSE_KERNEL_VERSION;
    if (in.major != FUSE_KERNEL_VERSION) {
        // The kernel retries with our major if it can.
        co_return FuseReply::of(out);
    }
    kernel_minor_ = in.minor;
    out.minor = std::min(kOurMinor, in.minor);
    out.max_readahead = in.max_readahead;
    // Not FUSE_ATOMIC_O_TRUNC: with it the kernel sets a file's size to 0 after an O_TRUNC
    // open and keeps that until its next getattr, which NAME.raw (where O_TRUNC is ignored)
    // must not show (ExportFs::setattr).
    uint32_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES |
                    FUSE_PARALLEL_DIROPS |
                    FUSE_ABORT_ERROR;  // an abort reads ECONNABORTED, told apart from an unmount
    out.flags = in.flags & want;
    out.max_background = options_.max_background;
    out.congestion_threshold = static_cast<uint16_t>(options_.max_background * 3 / 4);
    out.max_write = options_.max_write_bytes;
    out.time_gran = 1;
    // In the kernel's pages: it sizes a ring entry's payload as max_pages pages, and refuses
    // to register a buffer smaller than that.
    const auto page_bytes = static_cast<uint32_t>(::sysconf(_SC_PAGESIZE));
    out.max_pages =
        static_cast<uint16_t>(std::max<uint32_t>(1, options_.max_write_bytes / page_bytes));
    uint32_t kernel_flags2 = (in.flags & FUSE_INIT_EXT) != 0 ? in.flags2 : 0;
    uring_accepted_ = offer_uring(in.flags, kernel_flags2, &out.flags, &out.flags2);
    if (!uring_accepted_ && options_.uring == fuse_uring::Mode::kOn) {
        // uring=on promised this transport: refusing INIT fails the connection, and the
        // daemon reports the mount failed rather than up.
        init_done(make_error(EPROTO, "uring=on: FUSE-over-io_uring is not available: {}",
                             uring_refusal_));
        co_return FuseReply::err(EPROTO);
    }
    initialised_ = true;
    log_->debug("FUSE connection 7.{} (kernel 7.{}), max_write {}, {}", out.minor, in.minor,
                out.max_write,
                uring_accepted_ ? "FUSE-over-io_uring accepted" : transport().c_str());
    handler_->connected();
    if (!uring_accepted_) {
        init_done(Status{});  // else settle_ring() reports, once the ring is registered
    }
    co_return FuseReply::of(out);
}

Task<void> FuseServer::send(uint64_t unique, FuseReply reply) {
    fuse_out_header out{};
    out.unique = unique;
    out.error = -reply.error;
    out.len = static_cast<uint32_t>(sizeof out + (reply.error == 0 ? reply.data.size() : 0));
    iovec iov[2] = {
        {&out, sizeof out},
        {const_cast<uint8_t*>(reply.data.data()), reply.error == 0 ? reply.data.size() : 0}};
    // A reply the kernel had no memory for is sent again for as long as that lasts, as on the
    // ring (ring_entry): dropped, its caller (a loop device's worker) would wait for ever.
    int32_t res = 0;
    int attempts = 0;
    for (;;) {
        res = co_await loop_->submit([this, &iov](io_uring_sqe* sqe) {
            io_uring_prep_writev(sqe, fd_, iov, iov[1].iov_len != 0 ? 2 : 1, 0);
        });
        if (res >= 0) {
            break;
        }
        const bool quick_retry = co_await loop_->retry_transient(res, &attempts, true);
        if (quick_retry) {
            continue;
        }
        if ((res != -ENOMEM && res != -EAGAIN) || connection_ended_.load()) {
            break;
        }
        co_await loop_->sleep(std::chrono::milliseconds(100));
    }
    // ENOENT: the request was interrupted meanwhile; ENODEV/EBADF: unmounted. Neither is ours to
    // report.
    if (res < 0 && res != -ENOENT && res != -ENODEV && res != -EBADF) {
        log_->error("writing a FUSE reply failed: {}", strerror(-res));
    }
}

}  // namespace imgfs
