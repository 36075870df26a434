// PayloadPool: the payload areas of the FUSE request buffers, all in one anonymous mapping that
// asks for transparent huge pages.
//
// Why huge pages: every read of /dev/fuse pins the pages of the buffer it lands in
// (get_user_pages), and so does every reply written from one. On 4 KiB pages that page walk took
// about 15% of the daemon's CPU on 1 MiB writes; on 2 MiB pages it is one entry per 2 MiB.
//
// When pages go back: a huge page, once touched, stays resident, and giving one back costs a
// fault that zeroes 2 MiB on its next use, so pages go back lazily. A huge page no buffer in use
// overlaps is given back (MADV_DONTNEED) once it has been idle for `idle_ms`, or at once,
// least recently used first, while more than `resident_budget_bytes` of the pool is resident.
// Both are checked when a buffer is released, not by a timer: a daemon that goes idle after a
// burst keeps up to `resident_budget_bytes` resident until its next request.
// (Giving pages back eagerly whenever the pool was over a small budget made 4 KiB requests at
// queue depth 32 fault in a fresh huge page for most requests: a third of the IOPS.)
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/buffer.h"
#include "fuse/huge_aligned_region.h"

namespace imgfs {

class PayloadPool {
  public:
    static constexpr size_t kHugePageBytes = HugeAlignedRegion::kHugePageBytes;

    /// `buffer_bytes` is a multiple of 4096. Reserves address space for `max_buffers` buffers;
    /// nothing is resident until a buffer is written.
    using Clock = std::chrono::steady_clock;

    PayloadPool(size_t buffer_bytes, uint32_t max_buffers, size_t resident_budget_bytes,
                std::chrono::milliseconds idle_ms = std::chrono::milliseconds(1000));
    PayloadPool(const PayloadPool&) = delete;
    PayloadPool& operator=(const PayloadPool&) = delete;
    ~PayloadPool() = default;

    /// False if the address space could not be reserved (then nothing else may be called).
    [[nodiscard]] bool ok() const { return base_ != nullptr; }
    [[nodiscard]] uint32_t capacity() const { return max_buffers_; }
    [[nodiscard]] MutBuf buffer(uint32_t index) const;

    /// Buffer `index` is in use (a read or a request owns it); its pages are kept.
    void acquire(uint32_t index);
    /// Buffer `index` is free again; its first `touched_bytes` were written while in use.
    void release(uint32_t index, size_t touched_bytes, Clock::time_point now = Clock::now());

    /// Bytes of the pool counted resident (huge-page granular).
    [[nodiscard]] size_t resident_bytes() const;

  private:
    struct Page {
        uint32_t users = 0;     // buffers in use that overlap this huge page
        bool resident = false;  // touched since it was last given back
        Clock::time_point last_used;
    };
    void trim(Clock::time_point now);
    void give_back(Page* page);
    [[nodiscard]] size_t first_page(uint32_t index) const;
    [[nodiscard]] size_t end_page(uint32_t index, size_t bytes) const;

    size_t buffer_bytes_;
    uint32_t max_buffers_;
    size_t budget_bytes_;
    std::chrono::milliseconds idle_ms_;
    Clock::time_point last_sweep_;
    HugeAlignedRegion region_;
    uint8_t* base_ = nullptr;  // region_'s start once the pool is set up
    std::vector<Page> pages_;
};

}  // namespace imgfs
