// FUSE-over-io_uring (FUSE protocol 7.42): the kernel ABI, which Debian 12's <linux/fuse.h>
// (7.38) predates, declared here from the protocol description, and what decides whether a
// mount uses it. docs/research/fuse-uring.md has the protocol as measured on this kernel.
//
// The shape of it: after INIT (answered on /dev/fuse, with FUSE_OVER_IO_URING in flags2) the
// server hands the kernel ring entries with IORING_OP_URING_CMD (128-byte SQEs): a header
// buffer and a payload buffer each. A request arrives as the completion of an entry's command;
// the reply goes back, and the entry is handed back for the next request, in one
// COMMIT_AND_FETCH command. The kernel keeps one queue per possible CPU and only starts using
// the ring once every queue has an entry.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/result.h"

namespace imgfs::fuse_uring {

/// FUSE_OVER_IO_URING is bit 41 of the 64-bit INIT flags: bit 9 of flags2 (needs FUSE_INIT_EXT).
constexpr uint32_t kInitFlags2Bit = 1U << 9;
constexpr uint32_t kCmdRegister = 1;
constexpr uint32_t kCmdCommitAndFetch = 2;

/// The kernel-owned part of an entry's header buffer.
struct EntInOut {
    uint64_t flags;
    uint64_t commit_id;   // kernel to server: quote it in the COMMIT_AND_FETCH
    uint32_t payload_sz;  // request bytes in the payload buffer; then the reply's bytes
    uint32_t padding;
    uint64_t reserved;
};
/// The header buffer (iovec 0 of REGISTER).
struct ReqHeader {
    uint8_t in_out[128];  // fuse_in_header of the request, then fuse_out_header of the reply
    uint8_t op_in[128];   // the opcode's argument struct (empty for name-only opcodes)
    EntInOut ring_ent_in_out;
};
/// The command area of a 128-byte SQE (at kSqeCmdOffset).
struct CmdReq {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;  // the queue: a possible CPU's number
    uint8_t padding[6];
};
constexpr size_t kSqeCmdOffset = 48;
static_assert(sizeof(EntInOut) == 32 && offsetof(EntInOut, payload_sz) == 16);
static_assert(sizeof(ReqHeader) == 288 && offsetof(ReqHeader, ring_ent_in_out) == 256);
static_assert(sizeof(CmdReq) == 24 && offsetof(CmdReq, qid) == 16);

enum class Mode { kOff, kAuto, kOn };

/// "auto", "on" or "off" (the mount option uring=).
Result<Mode> parse_mode(std::string_view text);
const char* mode_name(Mode mode);

/// Empty if the kernel lets a FUSE server use io_uring, else why not (the fuse module's
/// enable_uring parameter is off or absent).
std::string unavailable_reason();

/// What serves a connection's requests, as `status` shows it.
struct RingState {
    bool accepted = false;  // offered in INIT and taken by the kernel
    uint32_t queues = 0;    // the kernel's queues (one per possible CPU)
    uint32_t entries_per_queue = 0;
    uint32_t loops = 1;           // event loops the queues are spread over
    uint32_t failed_entries = 0;  // entries whose registration the kernel refused
    int register_error = 0;       // the first refusal's errno
    bool in_use = false;          // every queue holds an entry, so the kernel sends through it
};

/// "io_uring (Q queues x E entries, L loops)", or "/dev/fuse" with the reason when the ring
/// was accepted but is not in use: the kernel switches to it once every queue holds an
/// entry, and one refused registration stops it taking more.
std::string describe(const RingState& ring);

/// How many CPUs a list like "0-1" or "0,2-5" names (the format of
/// /sys/devices/system/cpu/possible).
Result<uint32_t> count_cpus(std::string_view list);

/// How many queues the kernel keeps: one per possible CPU, numbered from 0
/// (/sys/devices/system/cpu/possible). The kernel counts the CPUs (num_possible_cpus) and
/// refuses a queue number at or past the count.
Result<uint32_t> possible_cpus();

}  // namespace imgfs::fuse_uring
