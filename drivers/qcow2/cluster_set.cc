#include "drivers/qcow2/cluster_set.h"

#include <algorithm>

namespace imgfs::qcow2 {

void ClusterSet::insert(uint64_t first, uint64_t count) {
    if (count == 0) {
        return;
    }
    uint64_t end = first + std::min(count, UINT64_MAX - first);
    // The run starting at or before `first`, if it reaches it, absorbs the new one.
    auto it = runs_.upper_bound(first);
    if (it != runs_.begin()) {
        auto prev = std::prev(it);
        if (prev->second >= first) {
            first = prev->first;
            end = std::max(end, prev->second);
            it = runs_.erase(prev);
        }
    }
    // Every run that starts within (or right after) the new one merges into it.
    while (it != runs_.end() && it->first <= end) {
        end = std::max(end, it->second);
        it = runs_.erase(it);
    }
    runs_.emplace(first, end);
}

bool ClusterSet::erase(uint64_t cluster) {
    auto it = runs_.upper_bound(cluster);
    if (it == runs_.begin()) {
        return false;
    }
    --it;
    const uint64_t first = it->first;
    const uint64_t end = it->second;
    if (cluster >= end) {
        return false;
    }
    runs_.erase(it);
    if (first < cluster) {
        runs_.emplace(first, cluster);
    }
    if (cluster + 1 < end) {
        runs_.emplace(cluster + 1, end);
    }
    return true;
}

bool ClusterSet::contains(uint64_t cluster) const {
    auto it = runs_.upper_bound(cluster);
    if (it == runs_.begin()) {
        return false;
    }
    return cluster < std::prev(it)->second;
}

std::optional<uint64_t> ClusterSet::first_in(uint64_t first, uint64_t count) const {
    if (count == 0) {
        return std::nullopt;
    }
    if (contains(first)) {
        return first;
    }
    auto next = runs_.upper_bound(first);
    if (next != runs_.end() && next->first - first < count) {
        return next->first;
    }
    return std::nullopt;
}

}  // namespace imgfs::qcow2
