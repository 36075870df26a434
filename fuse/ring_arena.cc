#include "fuse/ring_arena.h"

#include <cassert>

#include <sys/mman.h>

namespace imgfs {

RingArena::RingArena(size_t buffer_bytes, size_t head_bytes, uint32_t buffers)
    : buffer_bytes_(buffer_bytes), head_bytes_(head_bytes), buffers_(buffers) {
    assert(buffer_bytes % 4096 == 0 && head_bytes % 4096 == 0);
    assert(head_bytes <= kHugePageBytes && buffer_bytes - head_bytes <= kHugePageBytes);
    const size_t used = kStrideBytes * buffers;
    // One huge page more than needed, so that an aligned start fits.
    mapped_bytes_ = used + kHugePageBytes;
    void* p = ::mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        mapped_bytes_ = 0;
        return;
    }
    mapping_ = static_cast<uint8_t*>(p);
    auto addr = reinterpret_cast<uintptr_t>(mapping_);
    base_ = mapping_ + ((kHugePageBytes - addr % kHugePageBytes) % kHugePageBytes);
    // Advice only: without transparent huge pages every buffer is on small pages. Heads first,
    // all of it, then the tails; the kernel merges equal neighbours, so this makes two areas
    // per buffer.
    (void)::madvise(base_, used, MADV_NOHUGEPAGE);
    for (uint32_t i = 0; i < buffers; ++i) {
        (void)::madvise(base_ + size_t{i} * kStrideBytes + kHugePageBytes, kHugePageBytes,
                        MADV_HUGEPAGE);
    }
}

RingArena::~RingArena() {
    if (mapping_ != nullptr) {
        ::munmap(mapping_, mapped_bytes_);
    }
}

MutBuf RingArena::buffer(uint32_t index) const {
    assert(index < buffers_);
    return {base_ + size_t{index} * kStrideBytes + kHugePageBytes - head_bytes_, buffer_bytes_};
}

}  // namespace imgfs
