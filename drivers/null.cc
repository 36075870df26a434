#include "drivers/null.h"

#include <cstring>

namespace imgfs {

NullNode::NullNode(NodeEnv env, std::string name, NullOptions options)
    : Node(env, std::move(name)), options_(options) {
    size_ = options.size;
    caps_.write_zeroes = true;
    caps_.discard = true;
    caps_.block_status = true;
    caps_.resize = true;
}

Task<Status> NullNode::do_read(uint64_t /*offset*/, MutBuf buf) {
    if (options_.read_zeroes) {
        std::memset(buf.data(), 0, buf.size());
    }
    co_return Status{};
}

Task<Status> NullNode::do_write(uint64_t /*offset*/, ConstBuf /*buf*/) {
    co_return Status{};
}

Task<Status> NullNode::do_write_zeroes(uint64_t /*offset*/, uint64_t /*bytes*/,
                                       bool /*may_unmap*/) {
    co_return Status{};
}

Task<Status> NullNode::do_discard(uint64_t /*offset*/, uint64_t /*bytes*/) {
    co_return Status{};
}

Task<Status> NullNode::do_flush() {
    co_return Status{};
}

Task<Result<BlockStatus>> NullNode::do_block_status(uint64_t /*offset*/, uint64_t bytes) {
    co_return BlockStatus{options_.read_zeroes ? Alloc::kZero : Alloc::kData, bytes};
}

Task<Status> NullNode::do_truncate(uint64_t new_size) {
    size_ = new_size;
    co_return Status{};
}

}  // namespace imgfs
