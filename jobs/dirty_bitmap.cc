#include "jobs/dirty_bitmap.h"

#include <bit>

namespace imgfs {

DirtyBitmap::DirtyBitmap(uint64_t size_bytes, uint64_t granule_bytes)
    : size_(size_bytes), granule_(granule_bytes) {
    uint64_t bits = (size_bytes + granule_bytes - 1) / granule_bytes;
    words_.assign((bits + 63) / 64, 0);
}

void DirtyBitmap::set(uint64_t offset, uint64_t bytes) {
    if (bytes == 0 || offset >= size_) {
        return;
    }
    uint64_t last = (std::min(offset + bytes, size_) - 1) / granule_;
    for (uint64_t b = offset / granule_; b <= last; ++b) {
        uint64_t& w = words_[b / 64];
        uint64_t m = 1ULL << (b % 64);
        if ((w & m) == 0) {
            w |= m;
            ++count_;
        }
    }
}

void DirtyBitmap::clear(uint64_t offset, uint64_t bytes) {
    if (bytes == 0 || offset >= size_) {
        return;
    }
    uint64_t last = (std::min(offset + bytes, size_) - 1) / granule_;
    for (uint64_t b = offset / granule_; b <= last; ++b) {
        uint64_t& w = words_[b / 64];
        uint64_t m = 1ULL << (b % 64);
        if ((w & m) != 0) {
            w &= ~m;
            --count_;
        }
    }
}

bool DirtyBitmap::test(uint64_t offset) const {
    uint64_t b = offset / granule_;
    return b / 64 < words_.size() && (words_[b / 64] & (1ULL << (b % 64))) != 0;
}

std::optional<uint64_t> DirtyBitmap::next_dirty(uint64_t offset) const {
    uint64_t b = offset / granule_;
    for (uint64_t wi = b / 64; wi < words_.size(); ++wi) {
        uint64_t w = words_[wi];
        if (wi == b / 64) {
            w &= ~0ULL << (b % 64);
        }
        if (w != 0) {
            uint64_t bit = wi * 64 + static_cast<uint64_t>(std::countr_zero(w));
            if (bit * granule_ < size_) {
                return bit * granule_;
            }
            return std::nullopt;
        }
    }
    return std::nullopt;
}

}  // namespace imgfs
