#include "core/buffer.h"

#include <algorithm>
#include <cassert>
#include <new>

namespace imgfs {

AlignedBuffer::AlignedBuffer(size_t size, size_t alignment) : size_(size) {
    assert(is_power_of_two(alignment));
    void* p = nullptr;
    if (posix_memalign(&p, std::max(alignment, sizeof(void*)), std::max<size_t>(size, 1)) != 0) {
        throw std::bad_alloc();  // out of memory is not an operating error we can serve through
    }
    data_ = static_cast<uint8_t*>(p);
}

void IoVec::advance(size_t n) {
    assert(n <= bytes_);
    bytes_ -= n;
    size_t i = 0;
    while (n > 0 && i < vec_.size()) {
        if (n >= vec_[i].iov_len) {
            n -= vec_[i].iov_len;
            ++i;
        } else {
            vec_[i].iov_base = static_cast<uint8_t*>(vec_[i].iov_base) + n;
            vec_[i].iov_len -= n;
            n = 0;
        }
    }
    vec_.erase(vec_.begin(), vec_.begin() + static_cast<std::ptrdiff_t>(i));
}

bool is_zero(ConstBuf b) {
    const uint8_t* p = b.data();
    size_t n = b.size();
    // Word-at-a-time over the aligned middle; this sits on the write path (zero detection).
    while (n > 0 && !is_aligned_ptr(p, sizeof(uint64_t))) {
        if (*p != 0) {
            return false;
        }
        ++p;
        --n;
    }
    while (n >= 4 * sizeof(uint64_t)) {
        uint64_t w[4];
        std::memcpy(w, p, sizeof w);
        if ((w[0] | w[1] | w[2] | w[3]) != 0) {
            return false;
        }
        p += sizeof w;
        n -= sizeof w;
    }
    while (n > 0) {
        if (*p != 0) {
            return false;
        }
        ++p;
        --n;
    }
    return true;
}

}  // namespace imgfs
