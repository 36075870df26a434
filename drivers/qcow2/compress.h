// Decompression of compressed clusters (zlib raw deflate, zstd). Output is exactly one cluster;
// input may carry trailing bytes of the last sector, which are ignored.
#pragma once

#include "core/buffer.h"
#include "core/result.h"
#include "drivers/qcow2/format.h"

namespace imgfs::qcow2 {

/// Fills all of `out` from the stream in `in`; an error if the stream is broken or too short.
Status decompress_cluster(CompressionType type, ConstBuf in, MutBuf out);

}  // namespace imgfs::qcow2
