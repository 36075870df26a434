#include "core/chain_status.h"

#include <algorithm>

namespace imgfs {

Task<Result<ChainStatus>> block_status_above(Node* top, uint64_t offset, uint64_t bytes) {
    Node* n = top;
    uint64_t len = bytes;
    int depth = 0;
    for (;;) {
        if (offset >= n->size()) {
            // Past the end of a shorter backing layer: zeros, and this layer is what makes them
            // zeros. Whatever lies further down (a longer base) does not show here, so a job
            // that drops this layer must write these zeros where it drops it.
            co_return ChainStatus{false, len, depth};
        }
        len = std::min(len, n->size() - offset);
        CO_TRY_ASSIGN(BlockStatus st, co_await n->block_status(offset, len));
        if (st.alloc == Alloc::kData) {
            co_return ChainStatus{true, st.bytes, depth};
        }
        if (st.alloc == Alloc::kZero) {
            co_return ChainStatus{false, st.bytes, depth};
        }
        len = st.bytes;
        Child* b = n->backing();
        if (b == nullptr) {
            co_return ChainStatus{false, len, -1};
        }
        n = b->node();
        ++depth;
    }
}

}  // namespace imgfs
