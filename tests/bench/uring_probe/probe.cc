// probe.cc: a minimal FUSE server that speaks FUSE-over-io_uring (protocol 7.42) itself, to
// check the ABI on this kernel and to compare per-request cost with the classic /dev/fuse path.
//
// Build: g++ -std=c++20 -O1 probe.cc -luring -o probe
// Usage: ./probe [--mode=uring|classic|sync] [--depth=N] [--queues=N] [--iters=N]
//                [--daemon-cpu=C] [--client-cpu=C] [--no-enable] [--taskrun=coop|defer|none]
//                [--loops=N] [--clients=N] [--trace] [--small-payload] [--die-after=N]
//                [--drop-ring-after=N]
//   uring   : INIT over /dev/fuse read/write, then every request through COMMIT_AND_FETCH
//   classic : /dev/fuse read/write submitted through the same io_uring (like imgfs today)
//   sync    : blocking read(2)/write(2) on /dev/fuse (libfuse-style single thread)
//   --queues: register entries on only the first N queues (to test the "all queues" rule)
//   --loops : N event loops, each its own ring; loop i owns queue i and runs on CPU i
//   --small-payload / --die-after / --drop-ring-after: fallback and teardown experiments
//
// The filesystem: / with "hello" (small text) and "data" (64 MiB of a pattern, FOPEN_DIRECT_IO
// so that every pread is one FUSE READ). A forked client stats, cats, lists, then does
// --iters preads of 4 KiB at QD1 and reports microseconds per request.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <new>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <string>
#include <string_view>
#include <thread>
#include <unistd.h>
#include <vector>

#include <liburing.h>
#include <linux/fuse.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

// ---------------------------------------------------------------------------------------------
// The FUSE-over-io_uring ABI (kernel protocol 7.42), declared here because Debian 12's
// <linux/fuse.h> is 7.38.
namespace abi {
constexpr uint32_t kMinorWithUring = 42;
constexpr uint64_t kFuseOverIoUring = 1ULL << 41;  // INIT flag; lives in flags2 bit 9
constexpr uint64_t kFuseInitExt = 1ULL << 30;
constexpr size_t kInOutHeaderSz = 128;      // FUSE_URING_IN_OUT_HEADER_SZ
constexpr size_t kOpInOutSz = 128;          // FUSE_URING_OP_IN_OUT_SZ
constexpr uint32_t kCmdRegister = 1;        // FUSE_IO_URING_CMD_REGISTER
constexpr uint32_t kCmdCommitAndFetch = 2;  // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

struct EntInOut {         // struct fuse_uring_ent_in_out
    uint64_t flags;       // unused (0)
    uint64_t commit_id;   // kernel -> server: id to quote in COMMIT_AND_FETCH
    uint32_t payload_sz;  // kernel -> server: request payload bytes; server -> kernel: reply bytes
    uint32_t padding;
    uint64_t reserved;
};
struct ReqHeader {                // struct fuse_uring_req_header
    char in_out[kInOutHeaderSz];  // fuse_in_header (request) / fuse_out_header (reply)
    char op_in[kOpInOutSz];       // the opcode's first argument struct (e.g. fuse_read_in)
    EntInOut ring_ent_in_out;
};
struct CmdReq {          // struct fuse_uring_cmd_req, in the SQE128 command area (80 bytes)
    uint64_t flags;      // 0
    uint64_t commit_id;  // COMMIT_AND_FETCH: the commit_id received; REGISTER: 0
    uint16_t qid;        // queue index == CPU number
    uint8_t padding[6];
};
static_assert(sizeof(EntInOut) == 32);
static_assert(sizeof(ReqHeader) == 288);
static_assert(offsetof(ReqHeader, op_in) == 128);
static_assert(offsetof(ReqHeader, ring_ent_in_out) == 256);
static_assert(sizeof(CmdReq) == 24);
static_assert(offsetof(CmdReq, qid) == 16);
}  // namespace abi

// ---------------------------------------------------------------------------------------------
namespace {

const char* kMnt = "/tmp/uring_probe/mnt";
constexpr uint32_t kMaxWrite = 128 * 1024;
constexpr size_t kPayloadSz = kMaxWrite;  // >= max(8192, max_write, max_pages * 4096)
constexpr uint64_t kDataSize = 64ULL << 20;
const char kHello[] = "Hello from FUSE-over-io_uring!\n";

enum class Mode { kUring, kClassic, kSync };
struct Options {
    Mode mode = Mode::kUring;
    unsigned depth = 2;
    int queues = -1;  // -1: all
    long iters = 100000;
    int daemon_cpu = -1;
    int client_cpu = -1;
    bool enable = true;
    long die_after = -1;
    bool small_payload = false;
    std::string taskrun = "coop";
    bool trace = false;
    int loops = 1;  // uring: event loops (threads), each with its own ring and queue(s)
    int clients = 1;
    long drop_ring_after =
        -1;  // close the ring (mount still live) and fall back to read(2)  // concurrent benchmark
             // clients (client i pinned to CPU i when > 1)  // coop | defer | none: io_uring
             // task-work setup flags  // register a too-small payload buffer (REGISTER must fail)
             // // daemon _exit()s after this many ring requests (teardown test)
};
Options g_opt;

void die(const char* what) {
    fprintf(stderr, "probe: %s: %s\n", what, strerror(errno));
    exit(1);
}

void pin(int cpu) {
    if (cpu < 0)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s) != 0)
        die("sched_setaffinity");
}

void* alloc_pages(size_t n) {
    void* p =
        mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

uint64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// ---------------------------------------------------------------------------------------------
// The filesystem. A handler gets the header, the opcode's argument struct (`op`) and what
// follows it (`rest`: names), and writes its reply into `out`. Returns reply bytes, -errno,
// or kNoReply.
constexpr int kNoReply = INT32_MIN;
std::vector<uint8_t> g_pattern(kPayloadSz);
std::atomic<uint64_t> g_count_ops[64];
std::atomic<bool> g_notify_pending{false};
std::atomic<bool> g_notify_done{false};

// A server-initiated notification always goes through write(2) on /dev/fuse (unique 0); the
// ring cannot carry it. Invalidating "hello" drops its dentry; the inode is then evicted and
// the kernel sends FORGET, which travels on the classic queue as well.
void send_inval_entry(int fd) {
    if (!g_notify_pending || g_notify_done.exchange(true))
        return;
    struct {
        fuse_out_header oh;
        fuse_notify_inval_entry_out e;
        char name[8];
    } m{};
    m.oh.len = sizeof m.oh + sizeof m.e + 6;
    m.oh.error = FUSE_NOTIFY_INVAL_ENTRY;
    m.oh.unique = 0;
    m.e.parent = 1;
    m.e.namelen = 5;
    memcpy(m.name, "hello", 6);
    ssize_t n = write(fd, &m, m.oh.len);
    fprintf(stderr, "daemon: NOTIFY_INVAL_ENTRY(hello) via write(/dev/fuse): %s\n",
            n < 0 ? strerror(errno) : "ok");
}

void fill_attr(uint64_t ino, fuse_attr* a) {
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->nlink = 1;
    a->blksize = 4096;
    if (ino == 1) {
        a->mode = S_IFDIR | 0755;
        a->nlink = 2;
    } else if (ino == 2) {
        a->mode = S_IFREG | 0444;
        a->size = sizeof kHello - 1;
    } else {
        a->mode = S_IFREG | 0444;
        a->size = kDataSize;
    }
    a->blocks = (a->size + 511) / 512;
}

int handle(const fuse_in_header* h, const uint8_t* op, const uint8_t* rest, size_t rest_len,
           uint8_t* out, size_t out_cap) {
    if (h->opcode < 64)
        g_count_ops[h->opcode]++;
    switch (h->opcode) {
        case FUSE_LOOKUP: {
            std::string_view name(reinterpret_cast<const char*>(rest),
                                  strnlen((const char*)rest, rest_len));
            if (h->nodeid != 1)
                return -ENOENT;
            uint64_t ino = name == "hello" ? 2 : name == "data" ? 3 : 0;
            if (ino == 0)
                return -ENOENT;
            auto* e = reinterpret_cast<fuse_entry_out*>(out);
            memset(e, 0, sizeof *e);
            e->nodeid = ino;
            e->generation = 1;
            e->entry_valid = 3600;
            e->attr_valid = 3600;
            fill_attr(ino, &e->attr);
            return sizeof *e;
        }
        case FUSE_GETATTR: {
            auto* a = reinterpret_cast<fuse_attr_out*>(out);
            memset(a, 0, sizeof *a);
            a->attr_valid = 3600;
            fill_attr(h->nodeid, &a->attr);
            return sizeof *a;
        }
        case FUSE_OPEN:
        case FUSE_OPENDIR: {
            auto* o = reinterpret_cast<fuse_open_out*>(out);
            memset(o, 0, sizeof *o);
            o->fh = h->nodeid;
            if (h->nodeid == 3)
                o->open_flags = FOPEN_DIRECT_IO;
            return sizeof *o;
        }
        case FUSE_READ: {
            auto* r = reinterpret_cast<const fuse_read_in*>(op);
            uint64_t size = h->nodeid == 2 ? sizeof kHello - 1 : kDataSize;
            if (r->offset >= size)
                return 0;
            size_t n = std::min<uint64_t>(std::min<uint64_t>(r->size, size - r->offset), out_cap);
            memcpy(out, h->nodeid == 2 ? (const uint8_t*)kHello + r->offset : g_pattern.data(), n);
            return static_cast<int>(n);
        }
        case FUSE_READDIR: {
            auto* r = reinterpret_cast<const fuse_read_in*>(op);
            struct E {
                uint64_t ino;
                const char* name;
                uint32_t type;
            };
            const E ents[] = {
                {1, ".", DT_DIR}, {1, "..", DT_DIR}, {2, "hello", DT_REG}, {3, "data", DT_REG}};
            size_t len = 0;
            for (uint64_t i = r->offset; i < 4; ++i) {
                size_t nl = strlen(ents[i].name);
                size_t sz = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + nl);
                if (len + sz > r->size || len + sz > out_cap)
                    break;
                auto* d = reinterpret_cast<fuse_dirent*>(out + len);
                memset(d, 0, sz);
                d->ino = ents[i].ino;
                d->off = i + 1;
                d->namelen = static_cast<uint32_t>(nl);
                d->type = ents[i].type;
                memcpy(d->name, ents[i].name, nl);
                len += sz;
            }
            return static_cast<int>(len);
        }
        case FUSE_WRITE: {
            // Checks the ring layout of WRITE: fuse_write_in in op_in, data at payload offset 0.
            auto* w = reinterpret_cast<const fuse_write_in*>(op);
            bool same = rest_len >= w->size && memcmp(rest, g_pattern.data(), w->size) == 0;
            fprintf(stderr,
                    "daemon: WRITE off %llu size %u, data %s, data address %% 4096 = %lu "
                    "(%zu bytes after the op struct)\n",
                    (unsigned long long)w->offset, w->size, same ? "matches" : "DIFFERS",
                    (unsigned long)((uintptr_t)rest % 4096), rest_len);
            auto* o = reinterpret_cast<fuse_write_out*>(out);
            memset(o, 0, sizeof *o);
            o->size = w->size;
            return sizeof *o;
        }
        case FUSE_RELEASE:
            if (h->nodeid == 2)
                g_notify_pending = true;  // after `cat hello`: test a notify
            return 0;
        case FUSE_RELEASEDIR:
        case FUSE_FLUSH:
        case FUSE_DESTROY:
            return 0;
        case FUSE_STATFS: {
            auto* s = reinterpret_cast<fuse_statfs_out*>(out);
            memset(s, 0, sizeof *s);
            s->st.bsize = 4096;
            s->st.frsize = 4096;
            s->st.namelen = 255;
            return sizeof *s;
        }
        case FUSE_FORGET:
        case FUSE_BATCH_FORGET:
        case FUSE_INTERRUPT:
            return kNoReply;
        default:
            return -ENOSYS;
    }
}

// Size of the first (header) argument for the opcodes we parse, as the classic path lays it
// out contiguously after fuse_in_header. LOOKUP has no arg struct: the name follows directly.
size_t op_arg_size(uint32_t opcode) {
    switch (opcode) {
        case FUSE_READ:
        case FUSE_READDIR:
            return sizeof(fuse_read_in);
        case FUSE_OPEN:
        case FUSE_OPENDIR:
            return sizeof(fuse_open_in);
        case FUSE_GETATTR:
            return sizeof(fuse_getattr_in);
        case FUSE_RELEASE:
        case FUSE_RELEASEDIR:
            return sizeof(fuse_release_in);
        case FUSE_FLUSH:
            return sizeof(fuse_flush_in);
        case FUSE_WRITE:
            return sizeof(fuse_write_in);
        case FUSE_FORGET:
            return sizeof(fuse_forget_in);
        case FUSE_INTERRUPT:
            return sizeof(fuse_interrupt_in);
        default:
            return 0;
    }
}

// One classic request (buffer = header + args) -> reply written to `reply` (header + data).
// Returns the reply length, or 0 for no reply.
size_t handle_classic(uint8_t* buf, size_t len, uint8_t* reply, size_t reply_cap) {
    auto* h = reinterpret_cast<fuse_in_header*>(buf);
    size_t a = op_arg_size(h->opcode);
    const uint8_t* op = buf + sizeof *h;
    const uint8_t* rest = op + a;
    size_t rest_len = len > sizeof *h + a ? len - sizeof *h - a : 0;
    int r = handle(h, op, rest, rest_len, reply + sizeof(fuse_out_header),
                   reply_cap - sizeof(fuse_out_header));
    if (r == kNoReply)
        return 0;
    auto* o = reinterpret_cast<fuse_out_header*>(reply);
    o->unique = h->unique;
    o->error = r < 0 ? r : 0;
    o->len = static_cast<uint32_t>(sizeof *o + (r > 0 ? r : 0));
    return o->len;
}

// ---------------------------------------------------------------------------------------------
// INIT, over the classic read/write path (the ring cannot be registered before the connection
// is initialised: REGISTER returns -EAGAIN until then).
struct InitResult {
    uint32_t kernel_minor = 0;
    bool kernel_offers_uring = false;
    bool uring = false;
};

InitResult do_init(int fd, bool want_uring) {
    std::vector<uint8_t> buf(kMaxWrite + 4096);
    ssize_t n;
    do {
        n = read(fd, buf.data(), buf.size());
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        die("read INIT");
    auto* h = reinterpret_cast<fuse_in_header*>(buf.data());
    if (h->opcode != FUSE_INIT) {
        fprintf(stderr, "first request is opcode %u, not INIT\n", h->opcode);
        exit(1);
    }
    fuse_init_in in{};
    memcpy(&in, buf.data() + sizeof *h, std::min<size_t>(sizeof in, n - sizeof *h));
    uint64_t kflags = in.flags;
    if (in.flags & abi::kFuseInitExt)
        kflags |= uint64_t{in.flags2} << 32;
    InitResult res;
    res.kernel_minor = in.minor;
    res.kernel_offers_uring = (kflags & abi::kFuseOverIoUring) != 0;
    fuse_init_out out{};
    out.major = FUSE_KERNEL_VERSION;
    out.minor = std::min(abi::kMinorWithUring, in.minor);
    out.max_readahead = in.max_readahead;
    uint64_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | abi::kFuseInitExt;
    if (want_uring)
        want |= abi::kFuseOverIoUring;
    uint64_t flags = kflags & want;
    res.uring = (flags & abi::kFuseOverIoUring) != 0;
    out.flags = static_cast<uint32_t>(flags);
    out.flags2 = static_cast<uint32_t>(flags >> 32);
    out.max_background = 64;
    out.congestion_threshold = 48;
    out.max_write = kMaxWrite;
    out.time_gran = 1;
    out.max_pages = kMaxWrite / 4096;
    struct {
        fuse_out_header oh;
        fuse_init_out io;
    } rep{};
    rep.oh.len = sizeof rep;
    rep.oh.unique = h->unique;
    rep.io = out;
    if (write(fd, &rep, sizeof rep) != static_cast<ssize_t>(sizeof rep))
        die("write INIT reply");
    fprintf(stderr,
            "daemon: INIT kernel 7.%u, replied 7.%u, kernel offers uring: %s, "
            "negotiated uring: %s (flags2=%#x)\n",
            in.minor, out.minor, res.kernel_offers_uring ? "yes" : "no", res.uring ? "yes" : "no",
            out.flags2);
    return res;
}

// ---------------------------------------------------------------------------------------------
// user_data tags
constexpr uint64_t kTagEntry = 1ULL << 60;
constexpr uint64_t kTagRead = 2ULL << 60;
constexpr uint64_t kTagWrite = 3ULL << 60;
constexpr uint64_t kTagMask = 0xfULL << 60;

struct RingEntry {
    abi::ReqHeader* hdr;  // page aligned
    uint8_t* payload;     // page aligned, kPayloadSz
    iovec iov[2];
    uint16_t qid;
    bool live = false;  // a command is in flight in the kernel
};

struct ClassicSlot {
    uint8_t* buf;    // request
    uint8_t* reply;  // header + data
    size_t reply_len = 0;
};

struct Stats {
    uint64_t enters = 0, requests_ring = 0, requests_classic = 0;
    uint64_t enotconn = 0, other_err = 0;
    uint64_t per_qid[8] = {};
};

std::atomic<bool> g_child_done{false};

io_uring_sqe* get_sqe(io_uring* ring) {
    io_uring_sqe* sqe = io_uring_get_sqe(ring);
    if (!sqe) {
        io_uring_submit(ring);
        sqe = io_uring_get_sqe(ring);
    }
    if (!sqe) {
        fprintf(stderr, "no SQE\n");
        exit(1);
    }
    memset(sqe, 0, 128);  // SQE128: the command area is in the second half
    return sqe;
}

void prep_uring_cmd(io_uring* ring, int fd, RingEntry* e, uint32_t cmd, uint64_t commit_id,
                    uint64_t tag) {
    io_uring_sqe* sqe = get_sqe(ring);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = cmd;
    if (cmd == abi::kCmdRegister) {
        sqe->addr = reinterpret_cast<uint64_t>(e->iov);
        sqe->len = 2;
    }
    auto* c = reinterpret_cast<abi::CmdReq*>(sqe->cmd);
    c->commit_id = commit_id;
    c->qid = e->qid;
    sqe->user_data = tag;
    e->live = true;
}

void prep_read(io_uring* ring, int fd, ClassicSlot* s, size_t idx, size_t cap) {
    io_uring_sqe* sqe = get_sqe(ring);
    io_uring_prep_read(sqe, fd, s->buf, static_cast<unsigned>(cap), 0);
    sqe->user_data = kTagRead | idx;
}

void prep_write(io_uring* ring, int fd, ClassicSlot* s, size_t idx) {
    io_uring_sqe* sqe = get_sqe(ring);
    io_uring_prep_write(sqe, fd, s->reply, static_cast<unsigned>(s->reply_len), 0);
    sqe->user_data = kTagWrite | idx;
}

// The io_uring serving loop, for --mode=uring and --mode=classic.
void serve_sync(int fd, Stats* st);

// One event loop: its own ring, ring entries for `qids`, and (if `classic`) the /dev/fuse reads.
void serve_ring(int fd, bool uring, Stats* st, std::vector<int> qids, bool classic, int cpu) {
    pin(cpu);
    const size_t classic_cap = kMaxWrite + 4096;
    const unsigned nclassic = !classic ? 0 : uring ? 1 : 4;  // uring: one read for FORGET etc.
    const unsigned nent = uring ? qids.size() * g_opt.depth : 0;

    io_uring ring;
    io_uring_params p{};
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER;
    if (g_opt.taskrun == "coop")
        p.flags |= IORING_SETUP_COOP_TASKRUN;
    if (g_opt.taskrun == "defer")
        p.flags |= IORING_SETUP_DEFER_TASKRUN;
    int rc = io_uring_queue_init_params(64 + nent * 2, &ring, &p);
    if (rc < 0) {
        errno = -rc;
        die("io_uring_queue_init_params(SQE128)");
    }

    std::vector<RingEntry> ents(nent);
    for (unsigned i = 0; i < nent; ++i) {
        RingEntry& e = ents[i];
        e.hdr = static_cast<abi::ReqHeader*>(alloc_pages(4096));
        e.payload = static_cast<uint8_t*>(alloc_pages(kPayloadSz));
        e.iov[0] = {e.hdr, sizeof(abi::ReqHeader)};
        e.iov[1] = {e.payload, g_opt.small_payload ? 4096 : kPayloadSz};
        e.qid = static_cast<uint16_t>(qids[i / g_opt.depth]);
        prep_uring_cmd(&ring, fd, &e, abi::kCmdRegister, 0, kTagEntry | i);
    }
    std::vector<ClassicSlot> slots(nclassic);
    for (unsigned i = 0; i < nclassic; ++i) {
        slots[i].buf = static_cast<uint8_t*>(alloc_pages(classic_cap));
        slots[i].reply = static_cast<uint8_t*>(alloc_pages(classic_cap));
        prep_read(&ring, fd, &slots[i], i, classic_cap);
    }
    if (uring) {
        std::string q;
        for (int x : qids)
            q += " " + std::to_string(x);
        fprintf(stderr, "daemon: loop on cpu %d registers %u entries for qid(s)%s%s\n", cpu, nent,
                q.c_str(), classic ? " + classic /dev/fuse read" : "");
    }

    unsigned live_reads = nclassic;
    unsigned live_ents = nent;
    bool dev_gone = false;
    uint64_t gone_at = 0;
    while (live_reads + live_ents > 0) {
        if (dev_gone) {
            // Waiting for the ring entries to come back after the connection ended.
            __kernel_timespec ts{0, 100 * 1000 * 1000};
            io_uring_cqe* c;
            io_uring_submit(&ring);
            rc = io_uring_wait_cqe_timeout(&ring, &c, &ts);
            if (rc == -ETIME && now_ns() - gone_at > 5'000'000'000ULL) {
                fprintf(stderr, "daemon: %u ring entries never completed after ENODEV\n",
                        live_ents);
                break;
            }
        } else {
            rc = io_uring_submit_and_wait(&ring, 1);
            if (rc < 0 && rc != -EINTR) {
                errno = -rc;
                die("io_uring_submit_and_wait");
            }
        }
        ++st->enters;
        io_uring_cqe* cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            ++seen;
            uint64_t tag = cqe->user_data & kTagMask;
            size_t idx = cqe->user_data & ~kTagMask;
            int res = cqe->res;
            if (tag == kTagEntry) {
                RingEntry& e = ents[idx];
                e.live = false;
                if (res != 0) {
                    if (res == -ENOTCONN)
                        ++st->enotconn;
                    else
                        ++st->other_err;
                    if (res != -ENOTCONN)
                        fprintf(stderr, "daemon: ring entry %zu (qid %u): %s\n", idx, e.qid,
                                strerror(-res));
                    --live_ents;
                    continue;
                }
                ++st->requests_ring;
                ++st->per_qid[e.qid & 7];
                if (g_opt.die_after >= 0 && (long)st->requests_ring > g_opt.die_after) {
                    fprintf(stderr, "daemon: exiting abruptly with the ring and mount live\n");
                    _exit(3);
                }
                auto* h = reinterpret_cast<fuse_in_header*>(e.hdr->in_out);
                const uint64_t commit_id = e.hdr->ring_ent_in_out.commit_id;
                const uint32_t psz = e.hdr->ring_ent_in_out.payload_sz;
                if (g_opt.trace && st->requests_ring <= 40)
                    fprintf(stderr,
                            "trace: qid %u opcode %u in.len %u payload_sz %u -> op_in "
                            "bytes %d, total_extlen %u, commit_id %#lx unique %#lx\n",
                            e.qid, h->opcode, h->len, psz,
                            (int)h->len - (int)sizeof(fuse_in_header) - (int)psz, h->total_extlen,
                            (unsigned long)commit_id, (unsigned long)h->unique);
                // LOOKUP's name (and any data) is in the payload; the op struct is in op_in.
                int r = handle(h, reinterpret_cast<uint8_t*>(e.hdr->op_in), e.payload, psz,
                               e.payload, kPayloadSz);
                auto* o = reinterpret_cast<fuse_out_header*>(e.hdr->in_out);
                const uint64_t unique = h->unique;
                o->unique = unique;
                o->error = r < 0 && r != kNoReply ? r : 0;
                o->len = static_cast<uint32_t>(sizeof *o + (r > 0 ? r : 0));
                e.hdr->ring_ent_in_out.payload_sz = r > 0 ? static_cast<uint32_t>(r) : 0;
                prep_uring_cmd(&ring, fd, &e, abi::kCmdCommitAndFetch, commit_id, kTagEntry | idx);
                if (g_opt.drop_ring_after >= 0 && (long)st->requests_ring > g_opt.drop_ring_after) {
                    fprintf(stderr,
                            "daemon: closing the ring with the mount live; serving "
                            "read(2)/write(2) from now on\n");
                    io_uring_submit(&ring);  // the reply to this request still goes out
                    io_uring_queue_exit(&ring);
                    serve_sync(fd, st);
                    return;
                }
            } else if (tag == kTagRead) {
                ClassicSlot& s = slots[idx];
                if (res == -EINTR || res == -EAGAIN || res == -ENOENT) {
                    prep_read(&ring, fd, &s, idx, classic_cap);
                    continue;
                }
                if (res < 0) {
                    if (res != -ENODEV)
                        fprintf(stderr, "daemon: /dev/fuse read: %s\n", strerror(-res));
                    --live_reads;
                    if (!dev_gone) {
                        dev_gone = true;
                        gone_at = now_ns();
                    }
                    continue;
                }
                ++st->requests_classic;
                auto* h = reinterpret_cast<fuse_in_header*>(s.buf);
                static bool warned = false;
                if (uring && !warned && h->opcode != FUSE_FORGET &&
                    h->opcode != FUSE_BATCH_FORGET && h->opcode != FUSE_INTERRUPT)
                    warned = true, fprintf(stderr,
                                           "daemon: classic path got opcode %u while "
                                           "ring is on (further ones not logged)\n",
                                           h->opcode);
                s.reply_len = handle_classic(s.buf, res, s.reply, classic_cap);
                if (s.reply_len)
                    prep_write(&ring, fd, &s, idx);
                else
                    prep_read(&ring, fd, &s, idx, classic_cap);
            } else if (tag == kTagWrite) {
                if (res < 0 && res != -ENOENT && res != -ENODEV)
                    fprintf(stderr, "daemon: /dev/fuse write: %s\n", strerror(-res));
                if (res == -ENODEV) {
                    --live_reads;
                    continue;
                }
                prep_read(&ring, fd, &slots[idx], idx, classic_cap);
            }
        }
        io_uring_cq_advance(&ring, seen);
        send_inval_entry(fd);
    }
    uint64_t t0 = now_ns();
    io_uring_queue_exit(&ring);  // cancels whatever is still in flight
    fprintf(stderr, "daemon: ring closed (%.1f ms)\n", (now_ns() - t0) / 1e6);
}

void serve_sync(int fd, Stats* st) {
    const size_t cap = kMaxWrite + 4096;
    std::vector<uint8_t> buf(cap), reply(cap);
    for (;;) {
        ssize_t n = read(fd, buf.data(), cap);
        ++st->enters;
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            if (errno != ENODEV)
                perror("read /dev/fuse");
            return;
        }
        ++st->requests_classic;
        size_t rl = handle_classic(buf.data(), n, reply.data(), cap);
        send_inval_entry(fd);
        if (rl) {
            ++st->enters;
            if (write(fd, reply.data(), rl) < 0 && errno != ENOENT) {
                if (errno == ENODEV)
                    return;
                perror("write /dev/fuse");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
std::atomic<int>* g_ready;  // in shared memory: clients start the benchmark together

int client(int idx) {
    pin(g_opt.clients > 1 && g_opt.client_cpu < 0 ? idx : g_opt.client_cpu);
    if (g_opt.queues > 0 || g_opt.drop_ring_after >= 0)
        alarm(5);  // the first request may never be served
    std::string hello = std::string(kMnt) + "/hello";
    std::string data = std::string(kMnt) + "/data";
    uint64_t t0 = now_ns();
    struct stat sb;
    if (stat(hello.c_str(), &sb) != 0) {
        perror("client: stat hello");
        return 1;
    }
    uint64_t t1 = now_ns();
    printf("client: stat hello: mode %o size %lld (first request took %.1f ms incl. ring setup)\n",
           sb.st_mode, (long long)sb.st_size, (t1 - t0) / 1e6);
    fflush(stdout);
    std::string cmd =
        idx > 0 ? std::string("true")
                : "cat " + hello + " && ls -la " + kMnt + " && stat -c '%n %s %F' " + data;
    if (system(cmd.c_str()) != 0) {
        fprintf(stderr, "client: shell checks failed\n");
        return 1;
    }
    int fd = open(data.c_str(), O_RDONLY);
    if (fd < 0) {
        perror("client: open data");
        return 1;
    }
    alignas(4096) static uint8_t b[4096];
    if (idx == 0) {  // one 4 KiB write, to check the WRITE layout on the server side
        int wfd = open(data.c_str(), O_WRONLY);
        ssize_t w = wfd < 0 ? -1 : pwrite(wfd, g_pattern.data(), 4096, 8192);
        printf("client: pwrite(4096) -> %zd%s%s\n", w, w < 0 ? " " : "",
               w < 0 ? strerror(errno) : "");
        if (wfd >= 0)
            close(wfd);
        fflush(stdout);
    }
    const long warm = 2000;
    for (long i = 0; i < warm; ++i)
        pread(fd, b, sizeof b, (i * 4096) % kDataSize);
    g_ready->fetch_add(1);
    while (g_ready->load() < g_opt.clients)
        usleep(100);
    uint64_t s = now_ns();
    for (long i = 0; i < g_opt.iters; ++i) {
        ssize_t n = pread(fd, b, sizeof b, ((i * 7919) % (kDataSize / 4096)) * 4096);
        if (n != 4096) {
            fprintf(stderr, "client: pread returned %zd (%s)\n", n, strerror(errno));
            return 1;
        }
    }
    uint64_t e = now_ns();
    if (memcmp(b, g_pattern.data(), 4096) != 0) {
        fprintf(stderr, "client: data mismatch\n");
        return 1;
    }
    rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("client %d: %ld x pread(4096) QD1: %.2f us/request (%.0f IOPS), client cpu %d\n", idx,
           g_opt.iters, (e - s) / 1e3 / g_opt.iters, g_opt.iters / ((e - s) / 1e9), sched_getcpu());
    close(fd);
    fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        std::string_view a = argv[i];
        auto val = [&](std::string_view k) -> const char* {
            return a.substr(0, k.size()) == k ? argv[i] + k.size() : nullptr;
        };
        if (auto v = val("--mode=")) {
            std::string_view m = v;
            g_opt.mode = m == "uring"     ? Mode::kUring
                         : m == "classic" ? Mode::kClassic
                                          : Mode::kSync;
        } else if (auto v = val("--depth="))
            g_opt.depth = atoi(v);
        else if (auto v = val("--queues="))
            g_opt.queues = atoi(v);
        else if (auto v = val("--iters="))
            g_opt.iters = atol(v);
        else if (auto v = val("--daemon-cpu="))
            g_opt.daemon_cpu = atoi(v);
        else if (auto v = val("--client-cpu="))
            g_opt.client_cpu = atoi(v);
        else if (a == "--no-enable")
            g_opt.enable = false;
        else if (auto v = val("--die-after="))
            g_opt.die_after = atol(v);
        else if (a == "--small-payload")
            g_opt.small_payload = true;
        else if (auto v = val("--taskrun="))
            g_opt.taskrun = v;
        else if (a == "--trace")
            g_opt.trace = true;
        else if (auto v = val("--loops="))
            g_opt.loops = atoi(v);
        else if (auto v = val("--clients="))
            g_opt.clients = atoi(v);
        else if (auto v = val("--drop-ring-after="))
            g_opt.drop_ring_after = atol(v);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    for (size_t i = 0; i < g_pattern.size(); ++i)
        g_pattern[i] = static_cast<uint8_t>(i * 31 + 7);
    const bool want_uring = g_opt.mode == Mode::kUring;
    if (want_uring && g_opt.enable) {
        int p = open("/sys/module/fuse/parameters/enable_uring", O_WRONLY);
        if (p < 0 || write(p, "Y", 1) != 1)
            perror("enable_uring");
        if (p >= 0)
            close(p);
    }
    mkdir("/tmp/uring_probe", 0755);
    mkdir(kMnt, 0755);
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open /dev/fuse");
    char opts[256];
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=%u", fd,
             kMaxWrite);
    if (mount("uringprobe", kMnt, "fuse.uringprobe", MS_NOSUID | MS_NODEV, opts) != 0)
        die("mount");
    pin(g_opt.daemon_cpu);

    // The client starts at once: its first request blocks in the kernel until INIT is answered
    // and (for uring) the ring is ready.
    g_ready = static_cast<std::atomic<int>*>(
        mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
    new (g_ready) std::atomic<int>(0);
    std::vector<pid_t> kids;
    for (int c = 0; c < g_opt.clients; ++c) {
        pid_t child = fork();
        if (child < 0)
            die("fork");
        if (child == 0) {
            close(fd);
            _exit(client(c));
        }
        kids.push_back(child);
    }
    std::thread watcher([kids] {
        for (pid_t child : kids) {
            int status = 0;
            waitpid(child, &status, 0);
            fprintf(stderr, "watcher: client exited (%s %d)\n",
                    WIFEXITED(status) ? "status" : "signal",
                    WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        }
        g_child_done = true;
        fprintf(stderr, "watcher: umount2(MNT_DETACH)\n");
        uint64_t t0 = now_ns();
        if (umount2(kMnt, MNT_DETACH) != 0)
            perror("umount2");
        fprintf(stderr, "watcher: umount2 returned after %.2f ms\n", (now_ns() - t0) / 1e6);
    });

    InitResult init = do_init(fd, want_uring);
    if (want_uring && !init.uring)
        fprintf(stderr, "daemon: uring not negotiated; serving classic through the ring\n");
    Stats st;
    uint64_t t0 = now_ns();
    rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    if (g_opt.mode == Mode::kSync) {
        serve_sync(fd, &st);
    } else if (!init.uring || g_opt.loops <= 1) {
        const int ncpu = static_cast<int>(sysconf(_SC_NPROCESSORS_CONF));  // possible CPUs
        const int nq = g_opt.queues > 0 ? std::min(g_opt.queues, ncpu) : ncpu;
        std::vector<int> q;
        for (int i = 0; i < nq; ++i)
            q.push_back(i);
        serve_ring(fd, init.uring, &st, q, true, g_opt.daemon_cpu);
    } else {
        // Loop i serves queue i and is pinned to CPU i; loop 0 also takes the queues beyond
        // the loop count and the classic /dev/fuse reads.
        const int ncpu = static_cast<int>(sysconf(_SC_NPROCESSORS_CONF));
        std::vector<std::vector<int>> q(g_opt.loops);
        for (int i = 0; i < ncpu; ++i)
            q[i < g_opt.loops ? i : 0].push_back(i);
        std::vector<Stats> sts(g_opt.loops);
        std::vector<std::thread> th;
        for (int l = 1; l < g_opt.loops; ++l)
            th.emplace_back([&, l] { serve_ring(fd, true, &sts[l], q[l], false, l); });
        serve_ring(fd, true, &sts[0], q[0], true, 0);
        for (auto& t : th)
            t.join();
        for (auto& x : sts) {
            st.enters += x.enters;
            st.requests_ring += x.requests_ring;
            st.requests_classic += x.requests_classic;
            st.enotconn += x.enotconn;
            st.other_err += x.other_err;
            for (int i = 0; i < 8; ++i)
                st.per_qid[i] += x.per_qid[i];
        }
    }
    getrusage(RUSAGE_SELF, &r1);
    uint64_t t1 = now_ns();
    watcher.join();
    close(fd);
    double cpu =
        (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec + r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) +
        (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec + r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) /
            1e6;
    fprintf(stderr,
            "daemon: served %lu via ring, %lu via /dev/fuse read; %lu waits/syscalls; "
            "%lu ENOTCONN, %lu other errors; daemon cpu %.2f s over %.2f s\n",
            st.requests_ring, st.requests_classic, st.enters, st.enotconn, st.other_err, cpu,
            (t1 - t0) / 1e9);
    fprintf(stderr, "daemon: ring requests per qid: %lu %lu\n", st.per_qid[0], st.per_qid[1]);
    fprintf(stderr, "daemon: opcodes:");
    for (int i = 0; i < 64; ++i)
        if (g_count_ops[i])
            fprintf(stderr, " %d:%lu", i, g_count_ops[i].load());
    fprintf(stderr, "\n");
    return 0;
}
