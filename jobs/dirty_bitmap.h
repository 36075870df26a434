// DirtyBitmap: which granules of a guest range still differ between two layers (mirror/commit).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace imgfs {

class DirtyBitmap {
  public:
    DirtyBitmap(uint64_t size_bytes, uint64_t granule_bytes);

    /// Marks every granule that [offset, offset + bytes) touches.
    void set(uint64_t offset, uint64_t bytes);
    /// Clears every granule that lies wholly or partly in the range (the caller copies whole
    /// granules).
    void clear(uint64_t offset, uint64_t bytes);
    [[nodiscard]] bool test(uint64_t offset) const;
    /// The first dirty granule at or after `offset` (its byte offset).
    [[nodiscard]] std::optional<uint64_t> next_dirty(uint64_t offset) const;
    /// The bytes of the range the dirty granules cover (the last granule may end past it).
    [[nodiscard]] uint64_t dirty_bytes() const {
        uint64_t bytes = count_ * granule_;
        const uint64_t overhang = (granule_ - size_ % granule_) % granule_;
        if (overhang != 0 && size_ != 0 && test(size_ - 1)) {
            bytes -= overhang;
        }
        return bytes;
    }
    [[nodiscard]] uint64_t granule() const { return granule_; }
    [[nodiscard]] uint64_t size() const { return size_; }

  private:
    uint64_t size_;
    uint64_t granule_;
    std::vector<uint64_t> words_;
    uint64_t count_ = 0;
};

}  // namespace imgfs
