#include "drivers/chain_walk.h"

namespace imgfs {

ChainWalk::ChainWalk(std::string top, uint32_t max_depth)
    : top_(std::move(top)), max_depth_(max_depth) {}

Status ChainWalk::check_depth() const {
    if (room_for_more()) {
        return {};
    }
    return make_error(ELOOP, "backing chain of '{}' is deeper than {} layers", top_, max_depth_);
}

Status ChainWalk::enter(const std::string& file, FileId id) {
    path_ += path_.empty() ? file : " -> " + file;
    if (!ids_.insert(id).second) {
        return make_error(ELOOP, "the backing chain loops ({})", path_);
    }
    ++depth_;
    return {};
}

}  // namespace imgfs
