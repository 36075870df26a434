// FuseServer's FUSE-over-io_uring transport (see fuse/fuse_uring.h for the protocol).
//
// Each ring entry is one coroutine in the server's scope that owns a header buffer and a
// payload buffer registered with the kernel. A request arrives as the completion of the entry's
// command, is handled like a request read from /dev/fuse, and its reply goes back in the same
// buffers with COMMIT_AND_FETCH, which also hands the entry back for the next request. So an
// entry holds at most one request, and the entries of a queue bound how many requests of the
// CPUs mapped to it are served at once. INIT, FORGET, INTERRUPT and notifications stay on
// /dev/fuse, whose readers keep running.
//
// The kernel picks a queue by the CPU of the process making the request and insists on an entry
// in every possible CPU's queue before it uses the ring at all, so every queue gets entries. A
// queue's entries issue their commands on the loop that serves it (FuseServerOptions::
// ring_loops), and hop to the server's loop for everything else: parsing, the handler, the
// reply and the server's counters all run on the server's loop, so nothing here is shared
// between threads except an entry's own buffers, which only one thread uses at a time.
#include <algorithm>
#include <cstring>

#include "fuse/fuse_server.h"

namespace imgfs {

namespace {

constexpr size_t kArgAreaBytes = 4096;
// A ring entry's payload up to here is on small pages (see RingArena): requests of up to the
// kernel's default read-ahead window never make a huge page resident.
constexpr size_t kRingHeadBytes = 128 * 1024;
// Entries per queue whose payload spills into a huge page: the last registered of each queue,
// which the kernel hands out first (start_ring registers queue by queue in rounds, so they are
// the arena's last buffers).
constexpr uint32_t kHugeTailsPerQueue = 4;

void prep_fuse_cmd(io_uring_sqe* sqe, int fd, uint32_t cmd_op, const fuse_uring::CmdReq& cmd,
                   const iovec* iov) {
    std::memset(sqe, 0, 128);  // a 128-byte SQE: the command area is its second half
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = cmd_op;
    if (iov != nullptr) {
        sqe->addr = reinterpret_cast<uintptr_t>(iov);
        sqe->len = 2;
    }
    std::memcpy(reinterpret_cast<uint8_t*>(sqe) + fuse_uring::kSqeCmdOffset, &cmd, sizeof cmd);
}

}  // namespace

std::string FuseServer::transport() const {
    fuse_uring::RingState ring;
    ring.accepted = uring_accepted_;
    ring.queues = ring_queues_;
    ring.entries_per_queue = options_.uring_entries_per_queue;
    ring.loops = static_cast<uint32_t>(1 + options_.ring_loops.size());
    ring.register_error = ring_refusal_errno_;
    ring.failed_entries = ring_refused_total_;
    ring.in_use = ring_in_use_ || ring_served_ != 0;
    return fuse_uring::describe(ring);
}

bool FuseServer::offer_uring(uint32_t kernel_flags, uint32_t kernel_flags2, uint32_t* flags,
                             uint32_t* flags2) {
    using fuse_uring::Mode;
    if (options_.uring == Mode::kOff) {
        return false;
    }
    const char* mode = fuse_uring::mode_name(options_.uring);
    std::string why;
    Result<uint32_t> queues = fuse_uring::possible_cpus();
    if (!loop_->big_sqes()) {
        // The daemon sets the loop up without them when the kernel lacks the transport.
        why = fuse_uring::unavailable_reason();
        if (why.empty()) {
            why = "the event loop was set up without 128-byte SQEs";
        }
    } else if ((kernel_flags & FUSE_INIT_EXT) == 0 ||
               (kernel_flags2 & fuse_uring::kInitFlags2Bit) == 0) {
        std::string param = fuse_uring::unavailable_reason();
        why = "the kernel did not offer it in INIT" + (param.empty() ? "" : ": " + param);
    } else if (!queues) {
        why = queues.error().message();
    } else {
        // Never fewer than the kernel keeps: it would wait for the missing queues for ever.
        kernel_queues_ = *queues;
        ring_queues_ = std::max(options_.ring_queues, *queues);
        ring_arena_ = std::make_unique<RingArena>(
            options_.max_write_bytes, std::min<size_t>(kRingHeadBytes, options_.max_write_bytes),
            ring_queues_ * options_.uring_entries_per_queue,
            ring_queues_ * std::min(kHugeTailsPerQueue, options_.uring_entries_per_queue));
        if (!ring_arena_->ok()) {
            ring_arena_.reset();
            why = "cannot reserve address space for the ring buffers";
        }
    }
    if (!why.empty()) {
        uring_refusal_ = why;
        if (options_.uring == Mode::kOn) {
            log_->error("uring=on: FUSE-over-io_uring is not available: {}", why);
        } else {
            log_->info("uring={}: serving /dev/fuse: FUSE-over-io_uring is not available: {}", mode,
                       why);
        }
        return false;
    }
    *flags |= FUSE_INIT_EXT;
    *flags2 |= fuse_uring::kInitFlags2Bit;
    return true;  // settle_ring() says whether it serves
}

void FuseServer::start_ring() {
    const uint32_t per_queue = options_.uring_entries_per_queue;
    ring_refused_.assign(ring_queues_, 0);
    // One entry of every queue first, the highest queue first. The kernel switches to the
    // ring once each of its queues holds an entry, and some kernels take no more entries
    // after a refusal (6.18 here does not): registering this way, a queue the kernel does not
    // keep (the highest) is refused before any other registers, and a refusal after the
    // first round (memory) still leaves the ring serving. settle_ring() applies the rule.
    for (uint32_t i = 0; i < per_queue; ++i) {
        for (uint32_t q = ring_queues_; q-- > 0;) {
            auto e = std::make_unique<RingEntry>();
            auto index = static_cast<uint32_t>(ring_entries_.size());
            e->header = AlignedBuffer(4096);
            e->arg = AlignedBuffer(kArgAreaBytes);
            e->payload = ring_arena_->buffer(index);
            e->qid = static_cast<uint16_t>(q);
            size_t which = q % (1 + options_.ring_loops.size());
            e->loop = which == 0 ? loop_ : options_.ring_loops[which - 1];
            if (e->loop != loop_ && ring_remote_++ == 0) {
                // While entries wait on other loops nothing may be in flight here.
                loop_->hold_for_posts(1);
            }
            ring_entries_.push_back(std::move(e));
            scope_.spawn(ring_entry(ring_entries_.back().get()));
        }
    }
    scope_.spawn(settle_ring());
}

namespace {

enum class RingRequest { kOk, kMalformed, kOversized };

// The request in an entry's buffers as the handlers see it. Non-WRITE
// arguments are copied into `arg` (the kernel splits the argument struct from the names that
// follow it); WRITE data is used in place, and READ replies are produced in the payload.
RingRequest ring_request(fuse_uring::ReqHeader* hdr, MutBuf arg, MutBuf payload, FuseRequest* req) {
    const auto* h = reinterpret_cast<const fuse_in_header*>(hdr->in_out);
    const uint64_t payload_bytes = hdr->ring_ent_in_out.payload_sz;
    if (h->len < sizeof(fuse_in_header) + payload_bytes || payload_bytes > payload.size()) {
        return RingRequest::kMalformed;
    }
    const uint64_t op_bytes = h->len - sizeof(fuse_in_header) - payload_bytes;
    if (op_bytes > sizeof hdr->op_in) {
        return RingRequest::kMalformed;
    }
    req->header = h;
    req->scratch = payload;
    if (h->opcode == FUSE_WRITE) {
        req->arg = ConstBuf(hdr->op_in, op_bytes);
        req->payload = ConstBuf(payload.data(), payload_bytes);
        return op_bytes >= sizeof(fuse_write_in) ? RingRequest::kOk : RingRequest::kMalformed;
    }
    if (op_bytes + payload_bytes > arg.size()) {
        return RingRequest::kOversized;  // well-formed (a large xattr value), but not served
    }
    std::memcpy(arg.data(), hdr->op_in, op_bytes);
    std::memcpy(arg.data() + op_bytes, payload.data(), payload_bytes);
    req->arg = ConstBuf(arg.data(), op_bytes + payload_bytes);
    return RingRequest::kOk;
}

// Puts the reply into the entry's buffers: the out header in the header, the data in the
// payload (a READ reply is there already).
void ring_reply(fuse_uring::ReqHeader* hdr, MutBuf payload, uint64_t unique,
                const FuseReply& reply) {
    size_t bytes = reply.error == 0 ? reply.data.size() : 0;
    int error = reply.error;
    if (bytes > payload.size()) {
        bytes = 0;
        error = EIO;
    }
    if (bytes != 0 && reply.data.data() != payload.data()) {
        std::memmove(payload.data(), reply.data.data(), bytes);
    }
    fuse_out_header out{};
    out.unique = unique;
    out.error = -error;
    out.len = static_cast<uint32_t>(sizeof out + bytes);
    std::memcpy(hdr->in_out, &out, sizeof out);
    hdr->ring_ent_in_out.payload_sz = static_cast<uint32_t>(bytes);
}

}  // namespace

namespace {

// Between tries of a reply the kernel had no memory for, once the quick retries are spent.
constexpr std::chrono::milliseconds kOwedReplyRetry{100};

// A ring command's result that means the connection ended, not that the kernel refused it:
// ENOTCONN (an unmount), ECONNABORTED (an abort, with FUSE_ABORT_ERROR), ENODEV, ECANCELED
// (the ring is going away).
bool connection_gone(int32_t res) {
    return res == -ENOTCONN || res == -ECONNABORTED || res == -ENODEV || res == -ECANCELED;
}

}  // namespace

Task<void> FuseServer::ring_entry(RingEntry* entry) {
    iovec iov[2] = {{entry->header.data(), sizeof(fuse_uring::ReqHeader)},
                    {entry->payload.data(), entry->payload.size()}};
    fuse_uring::CmdReq cmd{};
    cmd.qid = entry->qid;
    EventLoop* ring = entry->loop;
    // Commands go out on the entry's loop; after each completion the entry hops to this
    // server's loop (no-ops when they are the same).
    co_await loop_->resume_on(ring);
    int32_t res = 0;
    int attempts = 0;
    bool sent = false;
    for (;;) {
        res = co_await ring->submit_work_wait([this, &iov, &cmd, &sent](io_uring_sqe* sqe) {
            prep_fuse_cmd(sqe, fd_, fuse_uring::kCmdRegister, cmd, iov);
            if (!sent) {
                sent = true;
                ring_registers_sent_.fetch_add(1);  // in the ring before any later no-op
            }
        });
        if (res >= 0) {
            break;
        }
        // Counted before the completion of this attempt lets anything else run here: a no-op
        // of settle_ring's that completes after it finds it (see settle_ring).
        ring_registers_retrying_.fetch_add(1);
        const bool again = co_await ring->retry_transient(res, &attempts, true);
        ring_registers_retrying_.fetch_sub(1);
        if (!again) {
            break;
        }
    }
    if (res < 0) {
        ring_registers_failed_.fetch_add(1);  // here, before a hop that may be overtaken
    }
    co_await ring->resume_on(loop_);
    if (res < 0) {
        ++ring_registers_failed_back_;
    }
    const bool refused = res < 0 && !connection_gone(res);
    if (refused) {
        note_refused_entry(entry->qid, -res);
    } else if (res < 0 && !ring_settled_) {
        ++ring_lost_before_settling_;  // a REGISTER that worked waits for a request
    }
    while (res == 0) {
        auto* hdr = reinterpret_cast<fuse_uring::ReqHeader*>(entry->header.data());
        cmd.commit_id = hdr->ring_ent_in_out.commit_id;
        co_await serve_ring_request(entry);
        co_await loop_->resume_on(ring);
        // Sent again while the kernel was short of memory for it (io_uring allocates a
        // command's state before FUSE sees it), for as long as that lasts: given up, the reply
        // would never reach its caller (a loop device's I/O would hang) and the queue would be
        // an entry short for good. An ended connection answers ENOTCONN instead.
        attempts = 0;
        for (;;) {
            res = co_await ring->submit_work_wait([this, &cmd](io_uring_sqe* sqe) {
                prep_fuse_cmd(sqe, fd_, fuse_uring::kCmdCommitAndFetch, cmd, nullptr);
            });
            if (res >= 0) {
                break;
            }
            const bool quick_retry = co_await ring->retry_transient(res, &attempts, true);
            if (quick_retry) {
                continue;
            }
            if ((res != -ENOMEM && res != -EAGAIN) || connection_ended_.load()) {
                break;  // nobody is waiting for the reply any more once the connection ended
            }
            co_await ring->sleep(kOwedReplyRetry);
        }
        co_await ring->resume_on(loop_);
    }
    if (!connection_gone(res) && !refused) {
        log_->error("FUSE ring entry on queue {}: {}", entry->qid, strerror(-res));
    }
    if (ring != loop_ && --ring_remote_ == 0) {
        loop_->hold_for_posts(-1);
    }
}

void FuseServer::note_refused_entry(uint16_t qid, int error) {
    ++ring_refused_[qid];
    if (ring_refused_total_++ == 0) {
        ring_refusal_errno_ = error;
        first_refused_qid_ = qid;
        if (ring_settled_) {
            // Not expected: refusals arrive with the registrations, before the ring settled.
            log_->warn("the kernel refused a FUSE ring entry of queue {} late: {}; status: {}", qid,
                       strerror(error), transport());
        }
    }
}

Task<void> FuseServer::settle_ring() {
    // A registration the kernel refuses completes at once, in submission order, so once a
    // no-op submitted after every entry's REGISTER on each loop has completed, every
    // refusal has been counted (their completions hop to this loop before the no-op's).
    std::vector<EventLoop*> loops{loop_};
    loops.insert(loops.end(), options_.ring_loops.begin(), options_.ring_loops.end());
    // While this waits on another loop nothing may be in flight here (the entries that held
    // the home loop may all have ended, an unmount right after the mount): without a hold the
    // home loop would take itself for hung.
    struct Hold {
        EventLoop* loop;
        explicit Hold(EventLoop* l) : loop(l) { loop->hold_for_posts(1); }
        Hold(const Hold&) = delete;
        Hold& operator=(const Hold&) = delete;
        ~Hold() { loop->hold_for_posts(-1); }
    } hold(loop_);
    // The hops to the entries' loops may come in any order (one the kernel had no memory for
    // goes the slower way, EventLoop::post), and a REGISTER refused for want of memory is sent
    // again after a pause: the no-ops go out once every entry's REGISTER is in its ring and
    // none waits to be sent again, and once more if one came back to be sent again meanwhile.
    const auto registers_pending = [this] {
        return ring_registers_sent_.load() < ring_entries_.size() ||
               ring_registers_retrying_.load() != 0;
    };
    do {
        while (registers_pending()) {
            co_await loop_->sleep(std::chrono::milliseconds(1));
        }
        for (EventLoop* ring : loops) {
            co_await loop_->resume_on(ring);
            (void)co_await ring->submit([](io_uring_sqe* sqe) { io_uring_prep_nop(sqe); });
            co_await ring->resume_on(loop_);
        }
    } while (registers_pending());
    // Each failed registration was counted on its loop before that loop's no-op completed,
    // but its hop back here may come after ours (the slower way, as above). Every one is
    // counted here before the ring is judged.
    const uint32_t failed = ring_registers_failed_.load();
    while (ring_registers_failed_back_ < failed) {
        co_await loop_->sleep(std::chrono::milliseconds(1));
    }
    ring_settled_ = true;
    if (ring_lost_before_settling_ != 0) {
        // Not a ring in use: nothing will ever be served. Said now, not as a mount that
        // came up and served nothing.
        init_done(make_error(ENOTCONN, "the FUSE connection ended while its ring was set up"));
        co_return;
    }
    // The kernel switches to the ring once each of its queues holds an entry; queues past
    // its count (ring_queues=) do not count.
    ring_in_use_ = true;
    for (uint32_t q = 0; q < std::min(kernel_queues_, ring_queues_); ++q) {
        ring_in_use_ = ring_in_use_ && ring_refused_[q] < options_.uring_entries_per_queue;
    }
    const char* mode = fuse_uring::mode_name(options_.uring);
    const std::string refused =
        ring_refused_total_ == 0
            ? std::string()
            : fmt::format("the kernel refused {} of {} ring entries (queue {}: {})",
                          ring_refused_total_, ring_entries_.size(), first_refused_qid_,
                          strerror(ring_refusal_errno_));
    if (options_.uring == fuse_uring::Mode::kOn && !refused.empty()) {
        // on: the ring as configured or no mount, even where the kernel would use what did
        // register (which differs between kernels).
        init_done(make_error(ring_refusal_errno_,
                             "uring=on: FUSE-over-io_uring is not available: {}", refused));
        co_return;
    }
    if (!ring_in_use_) {
        log_->info("uring={}: serving /dev/fuse: FUSE-over-io_uring is not available: {}", mode,
                   refused);
    } else {
        log_->info(
            "uring={}: serving through FUSE-over-io_uring, {} queues x {} entries on {} "
            "event loop{}{}",
            mode, ring_queues_, options_.uring_entries_per_queue, loops.size(),
            loops.size() == 1 ? "" : "s", refused.empty() ? "" : "; " + refused);
    }
    init_done(Status{});
}

Task<void> FuseServer::serve_ring_request(RingEntry* entry) {
    auto* hdr = reinterpret_cast<fuse_uring::ReqHeader*>(entry->header.data());
    ++active_;
    max_concurrent_ = std::max(max_concurrent_, active_);
    ++served_;
    ++ring_served_;
    FuseRequest req;
    FuseReply reply;
    uint64_t unique = reinterpret_cast<const fuse_in_header*>(hdr->in_out)->unique;
    const RingRequest parsed = ring_request(hdr, entry->arg.span(), entry->payload, &req);
    if (parsed == RingRequest::kMalformed) {
        log_->error("malformed FUSE request on the ring; answering EIO");
        reply = FuseReply::err(EIO);
    } else if (parsed == RingRequest::kOversized) {
        reply =
            oversized_request_reply(reinterpret_cast<const fuse_in_header*>(hdr->in_out)->opcode);
        if (reply.none) {
            reply = FuseReply::err(ENOSYS);  // an entry must answer (see below)
        }
    } else {
        reply = co_await dispatch(&req);
        if (reply.none) {
            // Requests without a reply (FORGET) come over /dev/fuse; an entry must answer.
            reply = FuseReply::err(ENOSYS);
        }
    }
    ring_reply(hdr, entry->payload, unique, reply);
    --active_;
}

}  // namespace imgfs
