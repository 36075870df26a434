#include "fuse/ring_arena.h"

#include <algorithm>
#include <cassert>

#include <sys/mman.h>

namespace imgfs {

RingArena::RingArena(size_t buffer_bytes, size_t head_bytes, uint32_t buffers, uint32_t huge_tails)
    : buffer_bytes_(buffer_bytes),
      head_bytes_(head_bytes),
      buffers_(buffers),
      region_(kStrideBytes * buffers) {
    assert(buffer_bytes % 4096 == 0 && head_bytes % 4096 == 0);
    assert(head_bytes <= kHugePageBytes && buffer_bytes - head_bytes <= kHugePageBytes);
    if (!region_.ok()) {
        return;
    }
    base_ = region_.base();
    // Advice only: without transparent huge pages every buffer is on small pages. All of it
    // first, then the tails, each of which splits off an area of its own.
    (void)::madvise(base_, kStrideBytes * buffers, MADV_NOHUGEPAGE);
    for (uint32_t i = buffers - std::min(buffers, huge_tails); i < buffers; ++i) {
        (void)::madvise(base_ + size_t{i} * kStrideBytes + kHugePageBytes, kHugePageBytes,
                        MADV_HUGEPAGE);
    }
}

MutBuf RingArena::buffer(uint32_t index) const {
    assert(index < buffers_);
    return {base_ + size_t{index} * kStrideBytes + kHugePageBytes - head_bytes_, buffer_bytes_};
}

}  // namespace imgfs
