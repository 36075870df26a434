// PayloadPool: the payload areas of the FUSE request buffers, all in one anonymous mapping that
// asks for transparent huge pages.
//
// Why huge pages: every read of /dev/fuse pins the pages of the buffer it lands in
// (get_user_pages), and so does every reply written from one. On 4 KiB pages that page walk took
// about 15% of the daemon's CPU on 1 MiB writes; on 2 MiB pages it is one entry per 2 MiB.
//
// Why a budget: a huge page, once touched, stays resident. Buffers are handed out most recently
// used first (so a steady stream keeps reusing the same resident pages), and when more than
// `resident_budget_bytes` of the pool is resident, the least recently used huge pages that no
// buffer in use overlaps are given back to the kernel (MADV_DONTNEED).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/buffer.h"

namespace imgfs {

class PayloadPool {
  public:
    static constexpr size_t kHugePageBytes = 2 << 20;

    /// `buffer_bytes` is a multiple of 4096. Reserves address space for `max_buffers` buffers;
    /// nothing is resident until a buffer is written.
    PayloadPool(size_t buffer_bytes, uint32_t max_buffers, size_t resident_budget_bytes);
    PayloadPool(const PayloadPool&) = delete;
    PayloadPool& operator=(const PayloadPool&) = delete;
    ~PayloadPool();

    /// False if the address space could not be reserved (then nothing else may be called).
    [[nodiscard]] bool ok() const { return base_ != nullptr; }
    [[nodiscard]] uint32_t capacity() const { return max_buffers_; }
    [[nodiscard]] MutBuf buffer(uint32_t index) const;

    /// Buffer `index` is in use (a read or a request owns it); its pages are kept.
    void acquire(uint32_t index);
    /// Buffer `index` is free again; its first `touched_bytes` were written while in use.
    void release(uint32_t index, size_t touched_bytes);

    /// Bytes of the pool counted resident (huge-page granular).
    [[nodiscard]] size_t resident_bytes() const;

  private:
    struct Page {
        uint32_t users = 0;     // buffers in use that overlap this huge page
        bool resident = false;  // touched since it was last given back
        uint64_t last_used = 0;
    };
    void trim();
    [[nodiscard]] size_t first_page(uint32_t index) const;
    [[nodiscard]] size_t end_page(uint32_t index, size_t bytes) const;

    size_t buffer_bytes_;
    uint32_t max_buffers_;
    size_t budget_bytes_;
    uint8_t* base_ = nullptr;  // kHugePageBytes aligned
    size_t mapped_bytes_ = 0;
    uint8_t* mapping_ = nullptr;  // what munmap gets
    std::vector<Page> pages_;
    uint64_t clock_ = 0;
};

}  // namespace imgfs
