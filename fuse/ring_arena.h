// RingArena: the payload buffers of the FUSE-over-io_uring entries, each a small-page head
// followed by a huge-page tail.
//
// Why two kinds of page: an entry keeps its buffer for the whole connection, and the kernel
// picks which entry a request lands in. On huge pages alone, every entry a 4 KiB request ever
// touched held 2 MiB (peak RSS 94 MiB at 4k QD32, against 27 on small pages). On small pages
// alone, a 1 MiB request is 256 scattered pages: the kernel pins each one to copy into or out of
// the buffer, and an O_DIRECT read of the disk into it needs more segments than one request may
// carry, so it is split. Measured on this design's host (fio 1M reads at QD1 of a chain's base,
// caches dropped): 860-1,050 MB/s on small pages, 1,240-1,250 on huge ones.
//
// So a buffer can start `head_bytes` before a 2 MiB boundary: a request of up to `head_bytes`
// touches small pages only, and a larger one spills into the one huge page that follows. That
// costs 2 MiB per buffer a large request ever used, against 1 MiB on small pages, and the
// kernel hands requests to the entry it got back last, so under sustained large requests at
// depth 8 some 30 entries of the two queues took part (peak RSS 72 MiB where small pages gave
// 44). Only the last `huge_tails` buffers are laid out this way: the entries registered last,
// which that order hands out first (a queue at depth 1 uses one or two), so their 2 MiB each
// bound what huge pages add. The others are on small pages throughout. Each buffer takes 4 MiB
// of address space, nothing of which is resident until written.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/buffer.h"
#include "fuse/huge_aligned_region.h"

namespace imgfs {

class RingArena {
  public:
    static constexpr size_t kHugePageBytes = HugeAlignedRegion::kHugePageBytes;

    /// `head_bytes` and `buffer_bytes` are multiples of 4096, with head_bytes <= 2 MiB and
    /// buffer_bytes - head_bytes <= 2 MiB. The last `huge_tails` buffers get a huge-page tail.
    /// Reserves address space only.
    RingArena(size_t buffer_bytes, size_t head_bytes, uint32_t buffers, uint32_t huge_tails);
    RingArena(const RingArena&) = delete;
    RingArena& operator=(const RingArena&) = delete;
    ~RingArena() = default;

    /// False if the address space could not be reserved (then nothing else may be called).
    [[nodiscard]] bool ok() const { return base_ != nullptr; }
    [[nodiscard]] uint32_t capacity() const { return buffers_; }
    [[nodiscard]] MutBuf buffer(uint32_t index) const;

  private:
    static constexpr size_t kStrideBytes = 2 * kHugePageBytes;

    size_t buffer_bytes_;
    size_t head_bytes_;
    uint32_t buffers_;
    HugeAlignedRegion region_;
    uint8_t* base_ = nullptr;  // region_'s start once the arena is set up
};

}  // namespace imgfs
