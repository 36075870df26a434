// What a reader of a whole chain sees at an offset: data from some layer, or zeros (a layer
// said zero, or no layer holds the range, or it lies past the end of a shorter backing file).
#pragma once

#include <cstdint>

#include "core/node.h"

namespace imgfs {

struct ChainStatus {
    bool data = false;   // false: the range reads as zeros
    uint64_t bytes = 0;  // length of the run, > 0
    // The layer that answered (0 = top), -1 if none did. Past the end of a shorter backing
    // layer, that layer answers (zeros): the range does not reach the layers below it.
    int depth = -1;
};

/// Walks from `top` down the backing edges. `offset` < top->size(); bytes > 0.
Task<Result<ChainStatus>> block_status_above(Node* top, uint64_t offset, uint64_t bytes);

}  // namespace imgfs
