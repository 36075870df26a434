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
// bound what huge pages add. The others are on small pages throughout, packed one after the
// other as before, so that the arena reserves (and, where the host does not overcommit,
// charges) little more than the buffers themselves: 4 MiB for each buffer with a tail, its
// size for each other one.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/buffer.h"
#include "fuse/huge_aligned_region.h"

namespace imgfs {

class RingArena {
  public:
    static constexpr size_t kHugePageBytes = HugeAlignedRegion::kHugePageBytes;

    /// `head_bytes` and `buffer_bytes` are multiples of 4096. The last `huge_tails` buffers
    /// get a huge-page tail, unless head_bytes > 2 MiB or the tail would not fit one huge page
    /// (buffer_bytes - head_bytes > 2 MiB): then none does. Reserves address space only.
    RingArena(size_t buffer_bytes, size_t head_bytes, uint32_t buffers, uint32_t huge_tails);
    RingArena(const RingArena&) = delete;
    RingArena& operator=(const RingArena&) = delete;
    ~RingArena() = default;

    /// False if the address space could not be reserved (then nothing else may be called).
    [[nodiscard]] bool ok() const { return base_ != nullptr; }
    [[nodiscard]] uint32_t capacity() const { return buffers_; }
    [[nodiscard]] MutBuf buffer(uint32_t index) const;

    /// How many buffers have a huge-page tail (the last ones).
    [[nodiscard]] uint32_t huge_tails() const { return huge_tails_; }

  private:
    // A buffer with a tail: its head's 2 MiB area, then its tail's.
    static constexpr size_t kTailStrideBytes = 2 * kHugePageBytes;

    [[nodiscard]] uint32_t plain_buffers() const { return buffers_ - huge_tails_; }
    [[nodiscard]] size_t tails_offset() const;  // where the first buffer with a tail's area starts

    size_t buffer_bytes_;
    size_t head_bytes_;
    uint32_t buffers_;
    uint32_t huge_tails_;
    HugeAlignedRegion region_;
    uint8_t* base_ = nullptr;  // region_'s start once the arena is set up
};

}  // namespace imgfs
