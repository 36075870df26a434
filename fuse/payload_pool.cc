#include "fuse/payload_pool.h"

#include <algorithm>
#include <cassert>

#include <sys/mman.h>

namespace imgfs {

PayloadPool::PayloadPool(size_t buffer_bytes, uint32_t max_buffers, size_t resident_budget_bytes,
                         std::chrono::milliseconds idle_ms)
    : buffer_bytes_(buffer_bytes),
      max_buffers_(max_buffers),
      budget_bytes_(resident_budget_bytes),
      idle_ms_(idle_ms),
      region_(buffer_bytes * max_buffers) {
    assert(buffer_bytes % 4096 == 0 && buffer_bytes > 0);
    const size_t huge_pages = (buffer_bytes * max_buffers + kHugePageBytes - 1) / kHugePageBytes;
    if (!region_.ok()) {
        return;
    }
    base_ = region_.base();
    // Advice only: without transparent huge pages the pool works on 4 KiB pages.
    (void)::madvise(base_, huge_pages * kHugePageBytes, MADV_HUGEPAGE);
    pages_.resize(huge_pages);
}

MutBuf PayloadPool::buffer(uint32_t index) const {
    assert(index < max_buffers_);
    return {base_ + size_t{index} * buffer_bytes_, buffer_bytes_};
}

size_t PayloadPool::first_page(uint32_t index) const {
    return size_t{index} * buffer_bytes_ / kHugePageBytes;
}

size_t PayloadPool::end_page(uint32_t index, size_t bytes) const {
    return (size_t{index} * buffer_bytes_ + bytes + kHugePageBytes - 1) / kHugePageBytes;
}

void PayloadPool::acquire(uint32_t index) {
    for (size_t p = first_page(index); p < end_page(index, buffer_bytes_); ++p) {
        ++pages_[p].users;
    }
}

void PayloadPool::release(uint32_t index, size_t touched_bytes, Clock::time_point now) {
    touched_bytes = std::min(touched_bytes, buffer_bytes_);
    for (size_t p = first_page(index); p < end_page(index, buffer_bytes_); ++p) {
        assert(pages_[p].users > 0);
        --pages_[p].users;
    }
    for (size_t p = first_page(index); p < end_page(index, touched_bytes); ++p) {
        pages_[p].resident = true;
        pages_[p].last_used = now;
    }
    trim(now);
}

size_t PayloadPool::resident_bytes() const {
    return static_cast<size_t>(std::count_if(pages_.begin(), pages_.end(),
                                             [](const Page& p) { return p.resident; })) *
           kHugePageBytes;
}

void PayloadPool::give_back(Page* page) {
    const size_t index = static_cast<size_t>(page - pages_.data());
    // Advice only: if the kernel refuses, the page stays resident and is reused as it is.
    (void)::madvise(base_ + index * kHugePageBytes, kHugePageBytes, MADV_DONTNEED);
    page->resident = false;
}

void PayloadPool::trim(Clock::time_point now) {
    // Idle pages: swept at most once per idle period, so a busy pool pays nothing here.
    if (now - last_sweep_ >= idle_ms_) {
        last_sweep_ = now;
        for (Page& p : pages_) {
            if (p.resident && p.users == 0 && now - p.last_used >= idle_ms_) {
                give_back(&p);
            }
        }
    }
    size_t resident = resident_bytes();
    while (resident > budget_bytes_) {
        Page* oldest = nullptr;
        for (Page& p : pages_) {
            if (p.resident && p.users == 0 &&
                (oldest == nullptr || p.last_used < oldest->last_used)) {
                oldest = &p;
            }
        }
        if (oldest == nullptr) {
            return;  // everything resident is in use
        }
        give_back(oldest);
        resident -= kHugePageBytes;
    }
}

}  // namespace imgfs
