#include "fuse/ring_arena.h"

#include <algorithm>
#include <cassert>

#include <sys/mman.h>

namespace imgfs {

namespace {

uint32_t tails_that_fit(size_t buffer_bytes, size_t head_bytes, uint32_t buffers,
                        uint32_t huge_tails) {
    const bool fits = head_bytes <= std::min(buffer_bytes, RingArena::kHugePageBytes) &&
                      buffer_bytes - head_bytes <= RingArena::kHugePageBytes;
    return fits ? std::min(buffers, huge_tails) : 0;
}

size_t round_up_to_huge_page(size_t bytes) {
    return (bytes + RingArena::kHugePageBytes - 1) / RingArena::kHugePageBytes *
           RingArena::kHugePageBytes;
}

}  // namespace

RingArena::RingArena(size_t buffer_bytes, size_t head_bytes, uint32_t buffers, uint32_t huge_tails)
    : buffer_bytes_(buffer_bytes),
      head_bytes_(head_bytes),
      buffers_(buffers),
      huge_tails_(tails_that_fit(buffer_bytes, head_bytes, buffers, huge_tails)),
      region_(round_up_to_huge_page(buffer_bytes * (buffers - huge_tails_)) +
              kTailStrideBytes * huge_tails_) {
    assert(buffer_bytes % 4096 == 0 && head_bytes % 4096 == 0);
    if (!region_.ok()) {
        return;
    }
    base_ = region_.base();
    // Advice only: without transparent huge pages every buffer is on small pages. All of it
    // first, then the tails, each of which splits off an area of its own.
    (void)::madvise(base_, tails_offset() + kTailStrideBytes * huge_tails_, MADV_NOHUGEPAGE);
    for (uint32_t i = 0; i < huge_tails_; ++i) {
        (void)::madvise(base_ + tails_offset() + size_t{i} * kTailStrideBytes + kHugePageBytes,
                        kHugePageBytes, MADV_HUGEPAGE);
    }
}

size_t RingArena::tails_offset() const {
    return round_up_to_huge_page(buffer_bytes_ * plain_buffers());
}

MutBuf RingArena::buffer(uint32_t index) const {
    assert(index < buffers_);
    if (index < plain_buffers()) {
        return {base_ + size_t{index} * buffer_bytes_, buffer_bytes_};
    }
    const size_t tail =
        tails_offset() + size_t{index - plain_buffers()} * kTailStrideBytes + kHugePageBytes;
    return {base_ + tail - head_bytes_, buffer_bytes_};
}

}  // namespace imgfs
