// HugeAlignedRegion: anonymous address space whose start is aligned to a 2 MiB huge page, for
// the FUSE request buffers (PayloadPool, RingArena). Reserved only (MAP_NORESERVE): nothing is
// resident until written. Unmapped when destroyed.
#pragma once

#include <cstddef>
#include <cstdint>

namespace imgfs {

class HugeAlignedRegion {
  public:
    static constexpr size_t kHugePageBytes = 2 << 20;

    /// Reserves at least `bytes`; ok() is false if the address space could not be had.
    explicit HugeAlignedRegion(size_t bytes);
    HugeAlignedRegion(const HugeAlignedRegion&) = delete;
    HugeAlignedRegion& operator=(const HugeAlignedRegion&) = delete;
    ~HugeAlignedRegion();

    [[nodiscard]] bool ok() const { return base_ != nullptr; }
    /// The aligned start (nullptr unless ok()).
    [[nodiscard]] uint8_t* base() const { return base_; }

  private:
    uint8_t* mapping_ = nullptr;  // what munmap gets
    size_t mapped_bytes_ = 0;
    uint8_t* base_ = nullptr;
};

}  // namespace imgfs
