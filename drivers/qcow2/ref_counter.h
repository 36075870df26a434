// RefCounter: references per host cluster, counted from the tables. The repair rebuilds the
// refcounts from it, and the open-time cross-check compares the stored refcounts with it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/result.h"
#include "drivers/qcow2/format.h"

namespace imgfs::qcow2 {

// The most clusters a count holds in memory (4 bytes each).
inline constexpr uint64_t kMaxCountedClusters = 1ULL << 27;
// How far past the end of the file a reference may point and still be counted. A crash leaves
// at most the clusters of in-flight allocations unwritten there; anything further is damage,
// and counting it would make the count's memory follow a corrupt offset.
inline constexpr uint64_t kMaxClustersPastEof = 1ULL << 16;

class RefCounter {
  public:
    /// Callers check fits() first; a larger file is counted only up to kMaxCountedClusters
    /// (add() fails past it), never with memory sized by the file.
    RefCounter(const Geometry& g, uint64_t file_size) : g_(g) {
        refs_.resize(std::min(file_clusters(g, file_size), kMaxCountedClusters), 0);
        limit_ = std::min(kMaxCountedClusters, refs_.size() + kMaxClustersPastEof);
    }
    /// Whether a file of `file_size` bytes can be counted (EFBIG if not).
    static Status fits(const Geometry& g, uint64_t file_size) {
        if (file_clusters(g, file_size) > kMaxCountedClusters) {
            return make_error(EFBIG, "{} clusters of {} bytes, more than the {} counted in memory",
                              file_clusters(g, file_size), g.cluster_size, kMaxCountedClusters);
        }
        return {};
    }
    RefCounter(const RefCounter&) = delete;
    RefCounter& operator=(const RefCounter&) = delete;

    // Counts `times` references to every cluster of [offset, offset + bytes). A count past
    // what a refcount of this image can hold is an error: stored, it would wrap.
    Status add(uint64_t offset, uint64_t bytes, const char* what, uint64_t times = 1) {
        if (bytes == 0 || times == 0) {
            return {};
        }
        uint64_t first = offset >> g_.cluster_bits;
        uint64_t last = (offset + bytes - 1) >> g_.cluster_bits;
        if (last >= limit_) {
            return make_error(EFBIG, "{} at {:#x} lies too far beyond the end of the file", what,
                              offset);
        }
        if (last >= refs_.size()) {
            refs_.resize(last + 1, 0);
        }
        const uint64_t max = std::min<uint64_t>(g_.refcount_max, UINT32_MAX);
        for (uint64_t c = first; c <= last; ++c) {
            if (times > max - refs_[c]) {
                return make_error(EINVAL,
                                  "cluster {:#x} ({}) is referenced more often than a refcount "
                                  "of {} can hold",
                                  c << g_.cluster_bits, what, max);
            }
            refs_[c] += static_cast<uint32_t>(times);
        }
        return {};
    }
    [[nodiscard]] uint64_t get(uint64_t cluster) const {
        return cluster < refs_.size() ? refs_[cluster] : 0;
    }
    [[nodiscard]] uint64_t clusters() const { return refs_.size(); }
    void set(uint64_t cluster, uint32_t v) {
        if (cluster >= refs_.size()) {
            refs_.resize(cluster + 1, 0);
        }
        refs_[cluster] = v;
    }

  private:
    static uint64_t file_clusters(const Geometry& g, uint64_t file_size) {
        return file_size / g.cluster_size + (file_size % g.cluster_size != 0 ? 1 : 0);
    }
    const Geometry& g_;
    std::vector<uint32_t> refs_;
    uint64_t limit_ = 0;  // first cluster index not counted
};

}  // namespace imgfs::qcow2
