// Byte views and aligned buffers. I/O APIs take spans (a pointer and a length into memory the
// caller keeps alive for the whole request); AlignedBuffer owns memory that O_DIRECT accepts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include <sys/uio.h>

namespace imgfs {

using MutBuf = std::span<uint8_t>;
using ConstBuf = std::span<const uint8_t>;

class AlignedBuffer {
  public:
    static constexpr size_t kDefaultAlignment = 4096;

    AlignedBuffer() = default;
    /// Allocates `size` bytes aligned to `alignment` (a power of two). Contents undefined.
    explicit AlignedBuffer(size_t size, size_t alignment = kDefaultAlignment);
    AlignedBuffer(AlignedBuffer&& o) noexcept
        : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
        if (this != &o) {
            std::free(data_);
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    ~AlignedBuffer() { std::free(data_); }

    static AlignedBuffer zeroed(size_t size, size_t alignment = kDefaultAlignment) {
        AlignedBuffer b(size, alignment);
        std::memset(b.data_, 0, size);
        return b;
    }

    [[nodiscard]] uint8_t* data() { return data_; }
    [[nodiscard]] const uint8_t* data() const { return data_; }
    [[nodiscard]] size_t size() const { return size_; }
    [[nodiscard]] MutBuf span() { return {data_, size_}; }
    [[nodiscard]] ConstBuf span() const { return {data_, size_}; }
    [[nodiscard]] MutBuf subspan(size_t off, size_t len) { return span().subspan(off, len); }

  private:
    uint8_t* data_ = nullptr;
    size_t size_ = 0;
};

/// A scatter list for vectored I/O (FUSE replies: header plus payload in one writev).
class IoVec {
  public:
    void append(const void* base, size_t len) {
        if (len != 0) {
            vec_.push_back(iovec{const_cast<void*>(base), len});  // NOLINT: iovec is non-const
            bytes_ += len;
        }
    }
    void append(ConstBuf b) { append(b.data(), b.size()); }
    void clear() {
        vec_.clear();
        bytes_ = 0;
    }
    /// Drops the first `n` bytes (after a short write).
    void advance(size_t n);

    [[nodiscard]] const iovec* data() const { return vec_.data(); }
    [[nodiscard]] unsigned count() const { return static_cast<unsigned>(vec_.size()); }
    [[nodiscard]] size_t bytes() const { return bytes_; }

  private:
    std::vector<iovec> vec_;
    size_t bytes_ = 0;
};

inline bool is_power_of_two(uint64_t v) {
    return v != 0 && (v & (v - 1)) == 0;
}
inline uint64_t align_down(uint64_t v, uint64_t a) {
    return v & ~(a - 1);
}
inline uint64_t align_up(uint64_t v, uint64_t a) {
    return (v + a - 1) & ~(a - 1);
}
inline bool is_aligned(uint64_t v, uint64_t a) {
    return (v & (a - 1)) == 0;
}
inline bool is_aligned_ptr(const void* p, uint64_t a) {
    return is_aligned(reinterpret_cast<uintptr_t>(p), a);
}
/// True if every byte of `b` is zero.
bool is_zero(ConstBuf b);

}  // namespace imgfs
