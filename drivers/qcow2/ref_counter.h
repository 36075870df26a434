// RefCounter: references per host cluster, counted from the tables. The repair rebuilds the
// refcounts from it, and the open-time cross-check compares the stored refcounts with it.
// A sparse counter counts only the clusters it is given (memory by their number, not by the
// file's size): whether any table names one of a few clusters, in an image of any size.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <unordered_map>
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
    /// A sparse counter: only `clusters` (cluster indexes) are counted; the rest is ignored.
    RefCounter(const Geometry& g, uint64_t file_size, const std::vector<uint64_t>& clusters)
        : g_(g), sparse_(true) {
        limit_ = file_clusters(g, file_size) + kMaxClustersPastEof;
        for (uint64_t c : clusters) {
            sparse_refs_.emplace(c, 0);
        }
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
        if (!sparse_ && last >= refs_.size()) {
            refs_.resize(last + 1, 0);
        }
        const uint64_t max = std::min<uint64_t>(g_.refcount_max, UINT32_MAX);
        for (uint64_t c = first; c <= last; ++c) {
            uint32_t* refs = slot(c);
            if (refs == nullptr) {
                continue;  // a sparse counter's uncounted cluster
            }
            if (times > max - *refs) {
                return make_error(EINVAL,
                                  "cluster {:#x} ({}) is referenced more often than a refcount "
                                  "of {} can hold",
                                  c << g_.cluster_bits, what, max);
            }
            *refs += static_cast<uint32_t>(times);
        }
        return {};
    }
    [[nodiscard]] uint64_t get(uint64_t cluster) const {
        if (sparse_) {
            auto it = sparse_refs_.find(cluster);
            return it != sparse_refs_.end() ? it->second : 0;
        }
        return cluster < refs_.size() ? refs_[cluster] : 0;
    }
    /// Dense counters only (the repair and the cross-check walk every cluster).
    [[nodiscard]] uint64_t clusters() const { return refs_.size(); }
    void set(uint64_t cluster, uint32_t v) {
        assert(!sparse_ && "a sparse counter is only read");
        if (cluster >= refs_.size()) {
            refs_.resize(cluster + 1, 0);
        }
        refs_[cluster] = v;
    }

  private:
    static uint64_t file_clusters(const Geometry& g, uint64_t file_size) {
        return file_size / g.cluster_size + (file_size % g.cluster_size != 0 ? 1 : 0);
    }
    uint32_t* slot(uint64_t cluster) {
        if (!sparse_) {
            return &refs_[cluster];
        }
        auto it = sparse_refs_.find(cluster);
        return it != sparse_refs_.end() ? &it->second : nullptr;
    }
    const Geometry& g_;
    bool sparse_ = false;
    std::vector<uint32_t> refs_;                          // dense: every cluster
    std::unordered_map<uint64_t, uint32_t> sparse_refs_;  // sparse: the given clusters
    uint64_t limit_ = 0;                                  // first cluster index not counted
};

}  // namespace imgfs::qcow2
