// Whole reads and writes with plain system calls, for the few places that may block: the offload
// thread, offline tools, and files in memory (FileNode::in_memory). Everything else goes through
// the event loop's io_uring (EventLoop::read_full/write_full).
#pragma once

#include <cstdint>

#include "core/buffer.h"
#include "core/result.h"

namespace imgfs {

/// pread until `buf` is full or the file ends (EINTR retried); the bytes read. Errors carry the
/// errno with the context "read": callers name the file.
Result<size_t> pread_full(int fd, MutBuf buf, uint64_t offset);

/// pwrite all of `buf` (EINTR retried); a write that makes no progress is EIO.
Status pwrite_full(int fd, ConstBuf buf, uint64_t offset);

}  // namespace imgfs
