// ClusterSet: a set of host cluster indexes kept as runs, so that a table of any size costs one
// entry. The metadata index must not cost one entry per cluster: a crafted image may name the
// same 32 MiB L1 table from 65,536 snapshots, or lay them out across a sparse file of terabytes.
#pragma once

#include <cstdint>
#include <map>
#include <optional>

namespace imgfs::qcow2 {

class ClusterSet {
  public:
    ClusterSet() = default;
    ClusterSet(const ClusterSet&) = delete;
    ClusterSet& operator=(const ClusterSet&) = delete;

    /// Adds clusters [first, first + count). Overlapping or adjacent runs merge.
    void insert(uint64_t first, uint64_t count = 1);
    /// Removes one cluster; true if it was in the set.
    bool erase(uint64_t cluster);
    [[nodiscard]] bool contains(uint64_t cluster) const;
    /// The lowest cluster of [first, first + count) in the set, if any.
    [[nodiscard]] std::optional<uint64_t> first_in(uint64_t first, uint64_t count) const;
    void clear() { runs_.clear(); }
    [[nodiscard]] size_t runs() const { return runs_.size(); }

  private:
    std::map<uint64_t, uint64_t> runs_;  // first cluster -> one past the last; disjoint, apart
};

}  // namespace imgfs::qcow2
